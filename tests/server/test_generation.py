"""Generation through the real server: unary, streaming, cancellation, concurrency, logging."""

from __future__ import annotations

import asyncio
import time

from instructd.client import Answer, AsyncClient

PROMPT = "Give three tips for staying healthy."


def test_unary_generation_answers_and_reports_usage(client):
    answer = client.generate(PROMPT, max_tokens=32, temperature=0)
    assert answer.text.strip()
    assert answer.finish_reason in ("stop", "length")
    assert answer.prompt_tokens > 5 and 0 < answer.completion_tokens <= 32
    assert answer.adapter_version == 0
    assert len(answer.response_id) == 32


def test_stream_yields_deltas_then_a_final_answer_with_the_same_text(client):
    events = list(client.stream(PROMPT, max_tokens=32, temperature=0))
    deltas, final = events[:-1], events[-1]
    assert isinstance(final, Answer) and all(isinstance(d, str) for d in deltas)
    assert len(deltas) > 1
    assert "".join(deltas) == final.text


def test_greedy_stream_and_unary_agree(client):
    unary = client.generate(PROMPT, max_tokens=24, temperature=0)
    streamed = list(client.stream(PROMPT, max_tokens=24, temperature=0))[-1]
    assert unary.text == streamed.text


def test_stop_strings_and_seed_are_honoured(client):
    answer = client.generate("Count from 1 to 10, separated by commas.", max_tokens=40, temperature=0, stop=["5"])
    assert "5" not in answer.text and answer.finish_reason == "stop"
    a = client.generate(PROMPT, max_tokens=16, temperature=1.0, seed=7)
    b = client.generate(PROMPT, max_tokens=16, temperature=1.0, seed=7)
    assert a.text == b.text


def test_every_exchange_is_logged_with_its_details(server, client):
    answer = client.generate([{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}],
                             max_tokens=16, temperature=0, user_id="alice")
    row = server.exchange(answer.response_id)
    assert row["app_id"] == "tests" and row["user_id"] == "alice"
    assert row["response"] == answer.text and row["adapter_version"] == 0
    assert row["completion_tokens"] == answer.completion_tokens and row["prompt_tokens"] == answer.prompt_tokens
    assert row["finish_reason"] == answer.finish_reason
    assert 0 < row["ttft_seconds"] <= row["latency_seconds"]
    assert '"Be brief."' in row["messages_json"] and '"max_tokens": 16' in row["sampling_json"]


def test_cancelling_a_stream_aborts_the_engine_request(server, client):
    before = server.metrics()
    stream = client.stream("Write a very long story about a dragon.", max_tokens=900, temperature=0)
    for _ in range(3):
        next(stream)
    stream.close()  # cancels the RPC
    key = 'instructd_requests_total{code="CANCELLED",method="GenerateStream"}'
    deadline = time.monotonic() + 120  # generous: on a loaded 2-core machine the abort can take a while to show
    while time.monotonic() < deadline:
        after = server.metrics()
        running = sum(v for k, v in after.items() if k.startswith("vllm:num_requests_running"))
        if after.get(key, 0) > before.get(key, 0) and running == 0:
            break
        time.sleep(0.2)
    assert after.get(key, 0) == before.get(key, 0) + 1
    assert running == 0
    row = next(server.db().query("SELECT * FROM exchanges WHERE finish_reason = 'abort' ORDER BY created_at DESC LIMIT 1"))
    assert 0 < row["completion_tokens"] < 900  # it stopped generating long before max_tokens


def test_concurrent_requests_all_succeed(server):
    async def run():
        async with AsyncClient(server.target) as c:
            prompts = [f"Name {n} fruits." for n in range(1, 17)]
            return await asyncio.gather(*(c.generate(p, max_tokens=24, temperature=0) for p in prompts))

    answers = asyncio.run(run())
    assert len({a.response_id for a in answers}) == 16
    assert all(a.text and a.completion_tokens > 0 for a in answers)

