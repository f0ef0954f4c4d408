"""The per-adapter CPU LoRA ops agree with vLLM's own, and skip tokens that have no adapter; a CPU that only
emulates bf16 serves a bf16 model in float32; on 2 cores vLLM computes on both."""

from __future__ import annotations

import os

import pytest
import torch

from instructd.server import engine

lora_ops = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")


def _case(seed: int, tokens: int = 37, slots: int = 4, rank: int = 8, width: int = 64, out: int = 96):
    g = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, slots, (tokens,), generator=g)
    return (torch.randn(tokens, width, generator=g), torch.randn(slots, 1, rank, width, generator=g),
            torch.randn(slots, 1, out, rank, generator=g), indices)


@pytest.mark.parametrize("seed", range(3))
def test_shrink_and_expand_match_vllm(seed):
    x, lora_a, lora_b, idx = _case(seed)
    want, got = torch.zeros(len(x), 8), torch.zeros(len(x), 8)
    lora_ops.bgmv_shrink(x, lora_a, want, idx, 0.5)
    engine._bgmv_shrink(x, lora_a, got, idx, 0.5)
    torch.testing.assert_close(got, want)

    base = torch.randn(len(x), 96)
    want, got = base.clone(), base.clone()
    lora_ops.bgmv_expand(want_in := torch.randn(len(x), 8), lora_b, want, idx, add_inputs=True)
    engine._bgmv_expand(want_in, lora_b, got, idx, add_inputs=True)
    torch.testing.assert_close(got, want)

    want, got = torch.zeros(len(x), 200), torch.zeros(len(x), 200)
    lora_ops.bgmv_expand_slice(want_in, lora_b, want, idx, 50, 96, add_inputs=False)
    engine._bgmv_expand_slice(want_in, lora_b, got, idx, 50, 96, add_inputs=False)
    torch.testing.assert_close(got, want)


def test_tokens_without_an_adapter_get_nothing_added():
    x, lora_a, _, idx = _case(7)
    idx[::2] = -1
    out = torch.zeros(len(x), 8)
    engine._bgmv_shrink(x, lora_a, out, idx)
    assert out[::2].abs().sum() == 0 and out[1::2].abs().sum() > 0


def test_a_cpu_that_emulates_bf16_serves_a_bf16_model_in_float32(server):
    assert engine.engine_dtype({"dtype": "bfloat16"}, emulated_bf16=True) == "float32"
    assert engine.engine_dtype({"torch_dtype": "bfloat16"}, emulated_bf16=True) == "float32"
    assert engine.engine_dtype({"dtype": "bfloat16"}, emulated_bf16=False) == "auto"
    assert engine.engine_dtype({"dtype": "float32"}, emulated_bf16=True) == "auto"
    # The real server on this machine: float32 exactly when its CPU has no native bf16.
    said = "this CPU has no native bf16" in server.log_path.read_text()
    assert said == (not engine.cpu_has_bf16())


def test_on_two_cores_the_engine_computes_on_both(server):
    assert [engine.reserved_cpus(n) for n in (1, 2, 3, 16)] == ["0", "0", None, None]
    # The real server on this machine says so exactly where the rule applies (and no one set the variable).
    cores = len(os.sched_getaffinity(0))
    said = f"{cores} CPU cores: vLLM computes on all of them" in server.log_path.read_text()
    assert said == (engine.reserved_cpus(cores) is not None and "VLLM_CPU_NUM_OF_RESERVED_CPU" not in os.environ)
