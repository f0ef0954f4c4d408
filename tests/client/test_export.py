"""`instructd export` against the real server: feedback as JSON lines in TRL's and OpenAI's formats, held-out rows
marked; the files load with `datasets` and TRL's trainers accept them (one step each, on the embedded model)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from instructd.client.cli import main as cli
from instructd.server.config import ENV_API_KEY


# (rating, correction, max_tokens): a greeting ends at its first punctuation mark (finish "stop") within 16 tokens;
# the last 👎 answer gets one token, so it is cut off (finish "length"). Greetings left to run on were all cut off at
# 16 tokens in one run, and the test then had no complete 👎 answer to look for.
EXCHANGES = [("up", "", 16), ("down", "Hello there, friend!", 16), ("down", "", 16),
             ("up", "Hi! Nice to meet you.", 16)] * 2 + [("down", "", 1)]


@pytest.fixture(scope="module")
def exported(server, admin, tmp_path_factory):
    _, key = admin.create_key("export-app", "app")
    finished = {}
    with server.client(key) as app:
        for i, (rating, correction, max_tokens) in enumerate(EXCHANGES):
            answer = app.generate(f"Greet person number {i}.", max_tokens=max_tokens, temperature=0,
                                  stop=["\n", ".", "!", ","])
            app.feedback(answer.response_id, rating, correction=correction, user_id=f"rater{i}")
            finished[answer.response_id] = (rating, answer.finish_reason)
    folder = tmp_path_factory.mktemp("export")
    files = {}
    for fmt in ("sft", "kto", "dpo", "openai"):
        result = CliRunner().invoke(cli, ["export", "--app", "export-app", "--format", fmt, "--target", server.target],
                                    env={ENV_API_KEY: server.api_key})
        assert result.exit_code == 0, result.output
        files[fmt] = folder / f"{fmt}.jsonl"
        files[fmt].write_text(result.output)
    return files, finished


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_format_holds_what_it_should(exported):
    files, finished = exported
    sft, kto, dpo, openai = (_rows(files[f]) for f in ("sft", "kto", "dpo", "openai"))
    assert len(dpo) == 2 and all(r["chosen"][0]["content"] == "Hello there, friend!" for r in dpo)
    assert all(r["messages"][-1]["role"] == "assistant" and "held_out" in r for r in sft)
    # KTO: every 👍 example of SFT, and the 👎 answers that were not cut off at max_tokens.
    complete_down = [i for i, (rating, finish) in finished.items() if rating == "down" and finish == "stop"]
    assert complete_down and ("down", "length") in finished.values()  # both kinds of 👎 are there
    assert sum(r["label"] for r in kto) == len(sft)
    assert sorted(r["exchange_id"] for r in kto if not r["label"]) == sorted(complete_down)
    assert all(set(r) == {"messages"} for r in openai)  # OpenAI's files carry nothing else
    assert len(openai) == sum(not r["held_out"] for r in sft)
    assert {r["exchange_id"] for r in sft} <= {r["exchange_id"] for r in kto}


def test_datasets_load_them_and_trl_trains_on_them(exported, model_dir, tmp_path):
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    one_step = {"max_steps": 1, "per_device_train_batch_size": 2, "report_to": [], "use_cpu": True,
                "save_strategy": "no", "output_dir": str(tmp_path)}
    for fmt, config, trainer in (("sft", SFTConfig, SFTTrainer), ("kto", KTOConfig, KTOTrainer),
                                 ("dpo", DPOConfig, DPOTrainer)):
        dataset = load_dataset("json", data_files=str(exported[0][fmt]), split="train")
        # Every row, held-out ones included: which rows are held out follows from the exchange ids, which are
        # random, so both of the DPO file's two rows are held out in one run out of 25 (0.2 x 0.2), and TRL
        # fails on the empty dataset that is left (StopIteration; a clean-clone CI run failed so).
        assert {type(held_out) for held_out in dataset["held_out"]} == {bool}, fmt
        result = trainer(model=str(model_dir), args=config(**one_step), train_dataset=dataset,
                         processing_class=tokenizer).train()
        assert result.global_step == 1, fmt
    assert load_dataset("json", data_files=str(exported[0]["openai"]), split="train").column_names == ["messages"]
