"""The MTP head: official weight names and shapes, the [embedding | hidden] order of fc, RoPE positions and
incremental drafting with its own cache, the hidden-source option, and checkpoint round trips (fused and
per-expert experts, through save_pretrained / load_model)."""

from __future__ import annotations

import copy

import pytest
import torch

from qwen35.config import config_from_dict
from qwen35.model import Qwen35ForCausalLM, SequenceCache
from qwen35.model.mtp import MTPHead, load_mtp, mtp_text_config

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _inference():
    """These are inference checks: no autograd graph (the model's inference paths run)."""
    with torch.no_grad():
        yield


def _body(moe: bool, mtp_layers: int = 1) -> dict:
    body = {
        "model_type": "qwen3_5_moe_text" if moe else "qwen3_5_text",
        "vocab_size": 97, "hidden_size": 32, "num_hidden_layers": 4,
        "layer_types": ["linear_attention"] * 3 + ["full_attention"],
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
        "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8,
        "linear_value_head_dim": 8, "linear_conv_kernel_dim": 4,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                            "mrope_section": [2, 1, 1]},
        "tie_word_embeddings": False, "mtp_num_hidden_layers": mtp_layers,
    }
    if moe:
        body.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                    shared_expert_intermediate_size=24)
    else:
        body["intermediate_size"] = 48
    return body


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Random non-trivial values everywhere (norm offsets included), so no check passes by symmetry."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _model_and_head(moe: bool = True, source: str = "post_norm", mtp_layers: int = 1):
    torch.manual_seed(0)
    model = Qwen35ForCausalLM(config_from_dict(_body(moe, mtp_layers))).eval()
    _randomize(model, 1)
    head = MTPHead(model.text_config, source).eval()
    _randomize(head, 2)
    return model, head


@pytest.mark.parametrize("moe", [True, False])
def test_official_names_and_shapes(moe: bool) -> None:
    model, head = _model_and_head(moe)
    H = 32
    names = head.official_state_dict()
    expected = {
        "mtp.fc.weight": (H, 2 * H), "mtp.pre_fc_norm_embedding.weight": (H,), "mtp.pre_fc_norm_hidden.weight": (H,),
        "mtp.norm.weight": (H,), "mtp.layers.0.input_layernorm.weight": (H,),
        "mtp.layers.0.post_attention_layernorm.weight": (H,),
        "mtp.layers.0.self_attn.q_proj.weight": (2 * 16 * 2, H), "mtp.layers.0.self_attn.k_proj.weight": (16, H),
        "mtp.layers.0.self_attn.v_proj.weight": (16, H), "mtp.layers.0.self_attn.o_proj.weight": (H, 2 * 16),
        "mtp.layers.0.self_attn.q_norm.weight": (16,), "mtp.layers.0.self_attn.k_norm.weight": (16,),
    }
    if moe:
        expected.update({"mtp.layers.0.mlp.gate.weight": (4, H), "mtp.layers.0.mlp.shared_expert_gate.weight": (1, H),
                         "mtp.layers.0.mlp.shared_expert.gate_proj.weight": (24, H),
                         "mtp.layers.0.mlp.shared_expert.up_proj.weight": (24, H),
                         "mtp.layers.0.mlp.shared_expert.down_proj.weight": (H, 24)})
        for e in range(4):  # official Qwen3.5 MTP experts are stored per expert, 2-D
            expected.update({f"mtp.layers.0.mlp.experts.{e}.gate_proj.weight": (16, H),
                             f"mtp.layers.0.mlp.experts.{e}.up_proj.weight": (16, H),
                             f"mtp.layers.0.mlp.experts.{e}.down_proj.weight": (H, 16)})
    else:
        expected.update({"mtp.layers.0.mlp.gate_proj.weight": (48, H), "mtp.layers.0.mlp.up_proj.weight": (48, H),
                         "mtp.layers.0.mlp.down_proj.weight": (H, 48)})
    assert {k: tuple(v.shape) for k, v in names.items()} == expected
    # embedding and lm_head belong to the main model only
    assert not any("embed_tokens" in k or "lm_head" in k for k in names)
    assert mtp_text_config(model.text_config).layer_types == ("full_attention",)


def test_embedding_half_comes_first() -> None:
    model, head = _model_and_head()
    with torch.no_grad():
        head.fc.weight[:, 32:] = 0  # the hidden half contributes nothing
    ids = torch.randint(0, 97, (2, 6))
    hidden = model(ids).hidden_states
    a, _ = head.draft(model, hidden, ids)
    b, _ = head.draft(model, torch.randn_like(hidden), ids)
    assert torch.equal(a, b)
    c, _ = head.draft(model, hidden, (ids + 1) % 97)
    assert not torch.allclose(a, c)


def test_matches_a_manual_forward() -> None:
    """fc([norm_e(embed(next)) | norm_h(final_norm(hidden))]) -> a full-attention layer at positions 0..T-1 ->
    mtp.norm -> lm_head, written out with the model's own pieces."""
    from qwen35.model.context import DenseContext

    model, head = _model_and_head()
    ids = torch.randint(0, 97, (2, 7))
    nxt = torch.randint(0, 97, (2, 7))
    hidden = model(ids).hidden_states
    e = head.pre_fc_norm_embedding(model.model.embed_tokens(nxt))
    h = head.pre_fc_norm_hidden(model.model.norm(hidden))
    x = head.fc(torch.cat([e, h], -1))
    pos = torch.arange(7)[None].expand(2, 7)
    x, _ = head.layers[0](x, DenseContext(rope=model.model.rotary(pos, x.dtype)))
    want = model.lm_head(head.norm(x))
    got, out_hidden = head.draft(model, hidden, nxt)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_hidden, head.norm(x), rtol=1e-5, atol=1e-5)  # post_norm: returns normed


def test_hidden_sources() -> None:
    model, post = _model_and_head(source="post_norm")
    pre = copy.deepcopy(post)
    pre.hidden_source = "pre_norm"
    ids = torch.randint(0, 97, (1, 5))
    hidden = model(ids).hidden_states
    a, ha = post.draft(model, hidden, ids)
    b, hb = pre(model.model.norm(hidden), ids, model.model.embed_tokens, model.lm_head, model.model.rotary)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ha, post.norm(hb))  # pre_norm returns the block output before mtp.norm
    c, _ = pre.draft(model, hidden, ids)  # reads the pre-norm hidden: a different input
    assert not torch.allclose(a, c)
    with pytest.raises(ValueError):
        MTPHead(model.text_config, "middle")


def test_incremental_with_own_cache_matches_full_call() -> None:
    """Drafting token by token with the head's own SequenceCache gives the full call's logits: position t of
    the MTP sequence uses RoPE position t whether it arrives alone or with the rest."""
    model, head = _model_and_head()
    ids = torch.randint(0, 97, (2, 9))
    out = model(ids)
    full, _ = head.draft(model, out.hidden_states[:, :-1], ids[:, 1:])
    cache = SequenceCache()
    parts = [head.draft(model, out.hidden_states[:, :4], ids[:, 1:5], cache=cache)[0]]
    for t in range(4, 8):
        parts.append(head.draft(model, out.hidden_states[:, t:t + 1], ids[:, t + 1:t + 2], cache=cache)[0])
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 8 and cache.next_position.tolist() == [8, 8]
    # explicit positions equal to the defaults change nothing; shifted positions do
    pos = torch.arange(8)[None].expand(2, 8)
    same, _ = head(out.hidden_states[:, :-1], ids[:, 1:], model.model.embed_tokens, model.lm_head,
                   model.model.rotary, position_ids=pos, final_norm=model.model.norm)
    torch.testing.assert_close(same, full)
    moved, _ = head(out.hidden_states[:, :-1], ids[:, 1:], model.model.embed_tokens, model.lm_head,
                    model.model.rotary, position_ids=pos + 5, final_norm=model.model.norm)
    assert not torch.allclose(moved, full)


def test_left_padded_batch_matches_solo_rows() -> None:
    model, head = _model_and_head()
    a = torch.randint(0, 97, (1, 7))
    b = torch.randint(0, 97, (1, 4))
    ids = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.tensor([[1] * 7, [0, 0, 0, 1, 1, 1, 1]])
    out = model(ids, attention_mask=mask)
    # an MTP position is real when its hidden state is (mask of positions 0..T-2), and takes its position
    batch, _ = head.draft(model, out.hidden_states[:, :-1], ids[:, 1:], attention_mask=mask[:, :-1])
    solo_b, _ = head.draft(model, model(b).hidden_states[:, :-1], b[:, 1:])
    # batched and solo matmuls round differently: float32 noise on logits of size ~10
    torch.testing.assert_close(batch[1, 3:], solo_b[0], rtol=1e-4, atol=1e-4)
    solo_a, _ = head.draft(model, model(a).hidden_states[:, :-1], a[:, 1:])
    torch.testing.assert_close(batch[0], solo_a[0], rtol=1e-4, atol=1e-4)


def test_logits_at_and_router_logits() -> None:
    model, head = _model_and_head()
    ids = torch.randint(0, 97, (2, 6))
    hidden = model(ids).hidden_states
    args = (hidden, ids, model.model.embed_tokens, model.lm_head, model.model.rotary)
    full, _, router = head.forward_with_router(*args, final_norm=model.model.norm)
    keep = torch.rand(2, 6) > 0.5
    some, _, _ = head.forward_with_router(*args, final_norm=model.model.norm, logits_at=keep)
    torch.testing.assert_close(some, full[keep])
    assert router.shape == (12, 4)


def test_recursive_steps_use_layer_k_mod_n() -> None:
    model, head = _model_and_head(mtp_layers=2)
    assert len(head.layers) == 2 and "mtp.layers.1.self_attn.q_proj.weight" in head.official_state_dict()
    ids = torch.randint(0, 97, (1, 5))
    hidden = model(ids).hidden_states
    l0, h0 = head.draft(model, hidden, ids, step=0)
    l2, _ = head.draft(model, hidden, ids, step=2)
    l1, _ = head.draft(model, hidden, ids, step=1)
    torch.testing.assert_close(l0, l2)
    assert not torch.allclose(l0, l1)
    # feeding its own output back: the hidden is already in the head's form, no final norm applied again
    l_next, _ = head.draft(model, h0, ids, step=1, from_model=False)
    assert l_next.shape == l0.shape


@pytest.mark.parametrize("per_expert", [True, False])
def test_official_round_trip(per_expert: bool) -> None:
    model, head = _model_and_head()
    tensors = head.official_state_dict(per_expert=per_expert)
    assert any(".experts.0." in k for k in tensors) == per_expert
    fresh = MTPHead(model.text_config)
    fresh.load_official(tensors)
    for k, v in head.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
    missing = dict(tensors)
    missing.pop("mtp.fc.weight")
    with pytest.raises(KeyError, match="mtp.fc.weight"):
        MTPHead(model.text_config).load_official(missing)
    if per_expert:
        partial = {k: v for k, v in tensors.items() if ".experts.3.up_proj" not in k}
        with pytest.raises(KeyError, match="gate_up_proj"):
            MTPHead(model.text_config).load_official(partial)
    bad = dict(tensors)
    bad["mtp.norm.weight"] = torch.zeros(5)
    with pytest.raises(ValueError, match="mtp.norm.weight"):
        MTPHead(model.text_config).load_official(bad)


def test_checkpoint_round_trip(tmp_path) -> None:
    import qwen35

    model, head = _model_and_head()
    model.extra_tensors = head.official_state_dict()
    model.save_pretrained(tmp_path)
    loaded = qwen35.load_model(tmp_path, dtype="float32")
    back = load_mtp(loaded)
    for k, v in head.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    ids = torch.randint(0, 97, (1, 6))
    want, _ = head.draft(model, model(ids).hidden_states, ids)
    got, _ = back.draft(loaded, loaded(ids).hidden_states, ids)
    torch.testing.assert_close(got, want)
    loaded.extra_tensors = {}
    assert load_mtp(loaded) is None
