"""int8 weights: the kernels against the dequantized float math, and the engine against the full forward."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from qwen35.engine.llm_engine import EngineConfig, LLMEngine
from qwen35.engine.params import SamplingParams
from qwen35.kernels import ops
from qwen35.model.linear import Linear
from qwen35.quant import Int8Experts, Int8Linear, quantize_int8
from qwen35.quant.int8 import quantize_rows
from tests.engine.conftest import tiny_model
from tests.engine.test_engine import prompts_of, run_all, solo_greedy


def test_rounding_error_bound():
    w = torch.randn(64, 100)
    q, s = quantize_rows(w)
    err = (q.float() * s[:, None] - w).abs()
    assert (err <= s[:, None] / 2 + 1e-7).all()


def test_int8_kernel_matches_dequantized_math(float_products):
    torch.manual_seed(0)
    lin = Linear(96, 80, bias=False)
    qlin = Int8Linear(lin)
    w = qlin.dequantized()
    for rows in (1, 3, 32, 33, 100):
        x = torch.randn(rows, 96)
        exact = x @ w.T
        torch.testing.assert_close(qlin(x), exact, rtol=1e-5, atol=1e-5)  # float32: widened path
        got = qlin(x.bfloat16()).float()  # bf16: int8 kernel (<= 32 rows) or widened path
        assert ((got - exact).abs() <= 0.02 * exact.abs().max()).all(), rows


def test_int8_q8_products_follow_their_reference():
    """The default int8-activation product through Int8Linear (every row count, float32 and bf16) against
    ops.linear_int8_q8_reference, and within the activation rounding (~0.5% relative) of the exact product."""
    torch.manual_seed(1)
    lin = Linear(96, 80, bias=False)
    qlin = Int8Linear(lin)
    w = qlin.dequantized()
    for rows in (1, 3, 32, 33, 100):
        x = torch.randn(rows, 96)
        with torch.inference_mode():
            got = qlin(x)
        if ops.native() is not None:
            torch.testing.assert_close(got, ops.linear_int8_q8_reference(x, qlin.qweight, qlin.scale),
                                       rtol=1e-5, atol=1e-5)
        exact = x @ w.T
        assert ((got - exact).norm() / exact.norm()) < 1e-2


def dequantized_twin(model):
    """A float model whose weights are exactly the dequantized int8 weights."""
    q = quantize_int8(copy.deepcopy(model))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, mod in q.named_modules():
            if isinstance(mod, Int8Linear):
                twin.get_submodule(name).weight.copy_(mod.dequantized())
            elif isinstance(mod, Int8Experts):
                e = twin.get_submodule(name)
                e.gate_up_proj.copy_(mod.gate_up_proj_q.float() * mod.gate_up_proj_scale[..., None])
                e.down_proj.copy_(mod.down_proj_q.float() * mod.down_proj_scale[..., None])
    return q, twin


def test_quantized_model_equals_its_dequantized_twin(float_products):
    for moe in (False, True):
        q, twin = dequantized_twin(tiny_model(moe))
        ids = torch.tensor([prompts_of([40], seed=1)[0]])
        with torch.no_grad():
            # float32 both ways; the int8 kernel sums each row in its own order: float32 noise through the layers
            torch.testing.assert_close(q(ids).logits, twin(ids).logits, rtol=1e-4, atol=1e-4)
        assert any(isinstance(m, Int8Linear) for m in q.modules())
        assert not any(isinstance(m, Int8Linear) for n, m in q.named_modules() if n.endswith("in_proj_a"))


@pytest.mark.parametrize("q8", [True, False])
def test_engine_on_quantized_model_equals_full_forward(q8, monkeypatch):
    """Batched, chunked decoding of an int8 MoE model gives its own full forward's greedy tokens, with int8
    activations (the default) and with float32 products."""
    for kind, lim in list(ops.LIMITS.items()):
        monkeypatch.setitem(ops.LIMITS, kind, dataclasses.replace(lim, q8_activations=q8))
    q = quantize_int8(tiny_model(True))
    eng = LLMEngine(q, None, EngineConfig(max_num_seqs=3, max_num_batched_tokens=16, block_size=4))
    prompts = prompts_of([3, 21, 9], seed=2)
    ids = [eng.add_request(p, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)) for p in prompts]
    got = run_all(eng)
    for rid, p in zip(ids, prompts):
        assert got[rid] == solo_greedy(q, p, 8)


@pytest.mark.parametrize("q8", [False, True])
def test_bf16_quantized_decode_tracks_float_model(cpu_kind, q8, monkeypatch):
    """A bf16 decode step through the int8 kernel is about as close to the float32 truth (the dequantized twin)
    as the same model run in plain bf16 is: the float32 kernel adds no error beyond bf16 rounding; rounding the
    activations to int8 as well (the default) adds its own, about as much again (measured 1.9x the bf16 error)."""
    from qwen35.model import SequenceCache

    monkeypatch.setitem(ops.LIMITS, cpu_kind, dataclasses.replace(ops.LIMITS[cpu_kind], q8_activations=q8))

    q, twin = dequantized_twin(tiny_model(False))
    ids = torch.tensor([prompts_of([12], seed=3)[0]])

    def last_step(m):
        with torch.no_grad():
            c = SequenceCache()
            m(ids[:, :-1], cache=c)
            return m(ids[:, -1:], cache=c).logits.float()  # one row: the int8 kernel when quantized

    want = twin(ids).logits[:, -1:].detach()
    err_int8 = (last_step(q.to(torch.bfloat16)) - want).abs().max()
    err_bf16 = (last_step(copy.deepcopy(twin).to(torch.bfloat16)) - want).abs().max()
    assert err_int8 <= (3.0 if q8 else 1.5) * err_bf16 + 0.01 * want.abs().max(), (err_int8, err_bf16)
