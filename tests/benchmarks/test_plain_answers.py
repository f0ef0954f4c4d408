"""The loop benchmark stops reading a plain answer once it loops, and that never changes the answer's verdict."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from benchmarks.loop import LOOPED, answer_until_it_loops, plain_quality


@dataclass
class Final:
    text: str
    finish_reason: str = "stop"
    adapter_version: int = 3


class FakeStream:
    """Streams `text` a few characters at a time, then the final answer; counts what was read."""

    def __init__(self, text: str) -> None:
        self.text, self.read, self.closed = text, 0, False

    async def stream(self, text: str, **options):
        try:
            for i in range(0, len(self.text), 3):
                self.read = i + 3
                yield self.text[i:i + 3]
            yield Final(self.text)
        finally:
            self.closed = True


def test_a_looping_answer_is_cut_and_fails_as_the_whole_answer_would():
    text = "Windmills turn wind into power. " + "The blades turn. " * 40 + "The end."
    client = FakeStream(text)
    answer = asyncio.run(answer_until_it_loops(client, "Explain windmills.", 0, 1024))
    assert answer.finish_reason == LOOPED and client.closed and client.read < len(text) / 4
    assert text.startswith(answer.text) and answer.text.count("The blades turn.") == 3
    assert not plain_quality(text, "stop", "wind")


def test_an_answer_that_does_not_loop_is_read_whole():
    text = ("Windmills turn wind into power. The blades turn a shaft. The shaft drives a generator.\n"
            "The blades turn. The blades turn.")  # twice is not a loop
    answer = asyncio.run(answer_until_it_loops(FakeStream(text), "Explain windmills.", 0, 1024))
    assert (answer.text, answer.finish_reason, answer.adapter_version) == (text, "stop", 3)
    assert plain_quality(answer.text, answer.finish_reason, "wind")
