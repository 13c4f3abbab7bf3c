"""The model contract every caller runs: ``rope``, ``hidden_states`` (+ router logits), ``compute_logits``, and
``model.mtp`` as a registered child module.  ``forward`` is built on the same calls, so the two agree exactly."""

from __future__ import annotations

import pytest
import torch

from qwen35.config import config_from_dict
from qwen35.model import Qwen35ForCausalLM, SequenceCache
from qwen35.model.context import DenseContext, dense_context
from qwen35.model.mtp import MTPHead
from tests.model.test_mtp import _body, _randomize

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _inference():
    with torch.no_grad():
        yield


def _model(moe: bool, mtp: bool = False) -> Qwen35ForCausalLM:
    torch.manual_seed(0)
    model = Qwen35ForCausalLM(config_from_dict(_body(moe)), mtp=mtp).eval()
    _randomize(model, 3)
    return model


@pytest.mark.parametrize("moe", [True, False])
def test_hidden_states_and_compute_logits_equal_forward(moe: bool) -> None:
    model = _model(moe)
    ids = torch.randint(0, 97, (2, 8))
    out = model(ids)
    ctx, _ = dense_context(model.rope, ids, dtype=model.dtype)
    h, router = model.hidden_states_and_router(ids, ctx)
    assert torch.equal(h, out.hidden_states)
    assert torch.equal(model.compute_logits(h), out.logits)
    assert len(router) == len(out.router_logits) == (4 if moe else 0)
    assert all(torch.equal(a, b) for a, b in zip(router, out.router_logits))
    ctx, _ = dense_context(model.rope, ids, dtype=model.dtype)
    assert torch.equal(model.hidden_states(ids, ctx), h)
    assert torch.equal(model.compute_logits(h[:, -3:]), model(ids, logits_to_keep=3).logits)
    # any leading shape (fewer rows may take another matmul path: rounding noise only)
    torch.testing.assert_close(model.compute_logits(h[0, [1, 5]]), out.logits[0, [1, 5]], rtol=1e-5, atol=1e-5)


def test_contract_under_a_cache_and_padding_equals_forward() -> None:
    model = _model(True)
    ids = torch.randint(0, 97, (2, 6))
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    a, b = SequenceCache(), SequenceCache()
    want = [model(ids, attention_mask=mask, cache=a).logits]
    ctx, finish = dense_context(model.rope, ids, b, attention_mask=mask, dtype=model.dtype)
    got = [model.compute_logits(model.hidden_states(ids, ctx))]
    finish()
    step = torch.randint(0, 97, (2, 1))
    want.append(model(step, cache=a).logits)
    ctx, finish = dense_context(model.rope, step, b, dtype=model.dtype)
    got.append(model.compute_logits(model.hidden_states(step, ctx)))
    finish()
    for w, g in zip(want, got):
        assert torch.equal(w, g)


def test_rope_is_the_models_rotary_table() -> None:
    model = _model(False)
    pos = torch.arange(7)[None].expand(2, 7)
    for p in (pos, pos[None].expand(3, 2, 7)):
        cos, sin = model.rope(p, torch.bfloat16)
        want = model.model.rotary(p, torch.bfloat16)
        assert cos.shape == (2, 7, model.text_config.rotary_dim) and cos.dtype == torch.bfloat16
        assert torch.equal(cos, want[0]) and torch.equal(sin, want[1])


def test_mtp_is_a_registered_child() -> None:
    plain = _model(True)
    assert plain.mtp is None and not any(n.startswith("mtp.") for n in plain.state_dict())
    model = _model(True, mtp=True)
    assert isinstance(model.mtp, MTPHead)
    names = [n for n, _ in model.named_parameters()]
    assert "mtp.fc.weight" in names and "mtp.layers.0.mlp.experts.gate_up_proj" in names
    assert names.index("lm_head.weight") < names.index("mtp.fc.weight")  # after the trunk and head
    model.to(torch.bfloat16)
    assert model.mtp.fc.weight.dtype == torch.bfloat16 and not model.mtp.training
    # attached later (as training does): same place in the module tree
    late = _model(True)
    late.mtp = MTPHead(late.text_config)
    assert [n for n, _ in late.named_parameters()] == names


def test_contract_holds_no_cpu_tensor() -> None:
    """The contract on a model on another device: on "meta" any CPU tensor made inside (positions, masks,
    tables) would raise.  (Dense FFN: the MoE dispatch counts tokens per expert, which meta cannot.)"""
    with torch.device("meta"):
        model = Qwen35ForCausalLM(config_from_dict(_body(False)), mtp=True)
    ids = torch.zeros(2, 5, dtype=torch.long, device="meta")
    cache = SequenceCache()
    for part in (ids, ids[:, :1]):  # a prompt, then a step from the cache's positions
        ctx, finish = dense_context(model.rope, part, cache, dtype=model.dtype)
        h = model.hidden_states(part, ctx)
        finish()
    assert h.device.type == "meta" and model.compute_logits(h).shape == (2, 1, 97)
    h = model.hidden_states(ids, dense_context(model.rope, ids, dtype=model.dtype)[0])
    x = model.mtp_hidden_states(ids, h, DenseContext(rope=model.rope(torch.zeros(2, 5, dtype=torch.long,
                                                                                  device="meta"), model.dtype)))
    assert model.compute_mtp_logits(x).shape == (2, 5, 97)
