"""Exported feedback as the files other trainers read: one JSON object per line, in TRL's conversational formats
(SFT, KTO for unpaired 👍/👎, DPO for a 👎 answer with its correction) or OpenAI's chat fine-tuning format.
Every record but OpenAI's carries `held_out` (never train on those: they judge) and `exchange_id`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from instructd.v1 import instructd_pb2 as pb

FORMATS = ("sft", "kto", "dpo", "openai")


def _conversation(row: pb.RatedExchange) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in row.messages]


def _answer(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def _examples(row: pb.RatedExchange) -> Iterator[tuple[str, bool]]:
    """(answer, desirable): the rated answer (unless cut off or empty), and a correction as a desirable one."""
    if row.response.strip() and row.finish_reason == "stop":
        yield row.response, row.rating == pb.RATING_UP
    if row.correction.strip():
        yield row.correction, True


def records(rows: Iterable[pb.RatedExchange], fmt: str) -> Iterator[dict]:
    """The records of `fmt` that the rows make."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    for row in rows:
        mark = {"held_out": row.held_out, "exchange_id": row.exchange_id}
        prompt = _conversation(row)
        if fmt == "dpo":
            if row.rating == pb.RATING_DOWN and row.correction.strip() and row.response.strip():
                yield {"prompt": prompt, "chosen": _answer(row.correction), "rejected": _answer(row.response), **mark}
            continue
        for answer, desirable in _examples(row):
            if fmt == "kto":
                yield {"prompt": prompt, "completion": _answer(answer), "label": desirable, **mark}
            elif desirable and fmt == "sft":
                yield {"messages": prompt + _answer(answer), **mark}
            elif desirable:  # openai: its files take "messages" only
                yield {"messages": prompt + _answer(answer)}
