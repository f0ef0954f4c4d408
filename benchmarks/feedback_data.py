"""A fixed set of rated exchanges for benchmarks/training.py, made once from the base model with transformers (no
server) and committed: simulated users ask examples/simulate_users.py's prompts ("... Answer in all lowercase
letters." and plain ones), rate each sampled answer by the same checks, and lowercase half of the 👎 answers as
corrections. Held out: the prompts about HELD_OUT_SUBJECTS, which no training example asks about.

    .venv/bin/python -m benchmarks.feedback_data      # remakes benchmarks/data/lowercase-feedback.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from examples.simulate_users import HELD_OUT_SUBJECTS, LOWERCASE, SUBJECTS, judge, prompts
from instructd.v1 import instructd_pb2 as pb

DATA = Path(__file__).parent / "data" / "lowercase-feedback.jsonl"
MAX_TOKENS = 160  # as examples/simulate_users.py asks the server for


def rated_exchanges(path: Path = DATA) -> list[pb.RatedExchange]:
    """The file's exchanges as the export RPC delivers them, for tuner/dataset.py's build_dataset."""
    rows = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        rows.append(pb.RatedExchange(
            exchange_id=r["exchange_id"], messages=[pb.ChatMessage(role="user", content=r["prompt"])],
            response=r["response"], finish_reason=r["finish_reason"], correction=r["correction"],
            rating=pb.RATING_UP if r["rating"] == "up" else pb.RATING_DOWN, rater=r["rater"], held_out=r["held_out"]))
    return rows


def answer_batch(tokenizer, model, asked: list[str], max_tokens: int, **sampling) -> list[tuple[str, str]]:
    """Answers to single-turn prompts with transformers, rendered as the server renders them: (text, finish)."""
    end = tokenizer.markup.convert_tokens_to_ids("<|im_end|>")
    ids = [tokenizer.render([{"role": "user", "content": p}]) for p in asked]
    width = max(map(len, ids))  # padded on the left, so every answer starts at the same position
    inputs = torch.tensor([[0] * (width - len(x)) + x for x in ids], device=model.device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=model.device)
    with torch.no_grad():
        out = model.generate(input_ids=inputs, attention_mask=mask, max_new_tokens=max_tokens, eos_token_id=end,
                             pad_token_id=0, **sampling)
    answers = []
    for row in out[:, width:].tolist():
        stop = end in row
        answers.append((tokenizer.decode(row[:row.index(end)] if stop else row),
                        "stop" if stop else "length"))
    return answers


def make(model_dir: Path, path: Path = DATA, seed: int = 0, plain_share: float = 0.3, batch: int = 16) -> None:
    """Samples one answer per prompt (temperature 0.7), rates it, writes the file."""
    from transformers import AutoModelForCausalLM

    from instructd.server.chat import ChatTokenizer

    rng = random.Random(seed)
    torch.manual_seed(seed)
    asked = [(p if rng.random() >= plain_share else p[: -len(LOWERCASE) - 1], held_out)
             for subjects, held_out in ((SUBJECTS, False), (HELD_OUT_SUBJECTS, True)) for p in prompts(subjects)]
    tokenizer = ChatTokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    answers = []
    for i in range(0, len(asked), batch):
        answers += answer_batch(tokenizer, model, [p for p, _ in asked[i:i + batch]], MAX_TOKENS, do_sample=True,
                                temperature=0.7)
        print(f"{len(answers)}/{len(asked)} answered")
    lines = []
    for n, ((prompt, held_out), (text, finish)) in enumerate(zip(asked, answers)):
        good = judge(prompt, text, finish)
        correction = ""
        if not good and prompt.endswith(LOWERCASE) and finish == "stop" and rng.random() < 0.5:
            correction = text.lower()
        lines.append(json.dumps({"exchange_id": f"x{n:03d}", "prompt": prompt, "response": text,
                                 "finish_reason": finish, "rating": "up" if good else "down",
                                 "correction": correction, "rater": f"user{n % 8}", "held_out": held_out}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    from instructd.server.config import default_cache
    from instructd.server.model import default_model

    make(default_model(default_cache()))
