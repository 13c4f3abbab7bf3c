"""The MTP head: official weight names and shapes, the [embedding | hidden] order of fc, RoPE positions and
incremental drafting with its own cache, the hidden-source option; ``model.mtp`` as loaded by ``load_model``
(fused and per-expert experts, dense and MoE, bit for bit the head the old second loader built), saved back
under the official names, absent without weights; and the head run under a context as the engine runs it."""

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


# ----------------------------------------------------------------------------------------------------------------
# model.mtp: one child module, loaded by the one checkpoint loader


def _write_folder(folder, model, mtp_tensors) -> None:
    """A checkpoint folder of ``model`` (its trunk) plus the given ``mtp.*`` tensors, as official files hold them."""
    from safetensors.torch import load_file, save_file

    model.save_pretrained(folder)
    tensors = load_file(str(folder / "model.safetensors"))
    assert not any(k.startswith("mtp.") for k in tensors)
    tensors.update({k: v.contiguous() for k, v in mtp_tensors.items()})
    save_file(tensors, str(folder / "model.safetensors"))


def _reference_head(model, tensors, source: str, dtype=torch.float32) -> MTPHead:
    """What the previous second loader (load_mtp) built: a head of the model's dtype filled by load_official."""
    ref = MTPHead(model.text_config, source).to(dtype)
    ref.load_official(tensors)
    return ref.eval()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("per_expert", [True, False])
@pytest.mark.parametrize("moe", [True, False])
def test_load_model_builds_model_mtp_like_the_old_loader(tmp_path, moe: bool, per_expert: bool, dtype: str) -> None:
    import qwen35

    model, head = _model_and_head(moe)
    tensors = head.official_state_dict(per_expert=per_expert)
    assert any(".experts.0." in k for k in tensors) == (moe and per_expert)
    _write_folder(tmp_path, model, tensors)
    loaded = qwen35.load_model(tmp_path, dtype=dtype)
    assert isinstance(loaded.mtp, MTPHead) and loaded.mtp.hidden_source == "post_norm"
    assert not any(k.startswith("mtp.") for k in loaded.extra_tensors)
    assert not loaded.mtp.training and not any(p.requires_grad for p in loaded.mtp.parameters())
    ref = _reference_head(loaded, tensors, "post_norm", loaded.dtype)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, loaded.mtp.state_dict()[k]), k
    ids = torch.randint(0, 97, (2, 7))
    hidden = loaded(ids).hidden_states
    want, want_h = ref.draft(loaded, hidden[:, :-1], ids[:, 1:])
    got, got_h = loaded.mtp.draft(loaded, hidden[:, :-1], ids[:, 1:])
    assert torch.equal(got, want) and torch.equal(got_h, want_h)  # bit for bit
    assert torch.equal(loaded.mtp.draft(loaded, got_h, ids[:, 1:], step=1, from_model=False)[0],
                       ref.draft(loaded, want_h, ids[:, 1:], step=1, from_model=False)[0])


def test_checkpoint_round_trip(tmp_path) -> None:
    """save_pretrained writes model.mtp under the official names (experts per expert) and load_model reads it
    back identically, hidden source included."""
    import qwen35
    from safetensors.torch import load_file

    model, head = _model_and_head(source="pre_norm")
    model.mtp = head
    assert "mtp.fc.weight" in model.state_dict() and any(p is head.fc.weight for p in model.parameters())
    model.save_pretrained(tmp_path)
    names = set(load_file(str(tmp_path / "model.safetensors")))
    assert set(head.official_state_dict()) <= names and "mtp.layers.0.mlp.experts.0.gate_proj.weight" in names
    loaded = qwen35.load_model(tmp_path, dtype="float32")
    assert loaded.mtp.hidden_source == "pre_norm" and loaded.extra_tensors == {}
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    ids = torch.randint(0, 97, (1, 6))
    want, _ = head.draft(model, model(ids).hidden_states, ids)
    got, _ = loaded.mtp.draft(loaded, loaded(ids).hidden_states, ids)
    assert torch.equal(got, want)
    # an explicit source wins over the recorded one; the compatibility shim returns model.mtp
    assert qwen35.load_model(tmp_path, mtp_hidden_source="post_norm").mtp.hidden_source == "post_norm"
    assert load_mtp(loaded) is loaded.mtp
    with pytest.raises(ValueError, match="mtp_hidden_source"):
        load_mtp(loaded, "post_norm")


def test_no_mtp_weights_no_head(tmp_path) -> None:
    import qwen35
    from qwen35.checkpoint import CheckpointError

    model, head = _model_and_head()
    model.save_pretrained(tmp_path / "plain")  # the config has an MTP layer, the folder no mtp.* tensors
    loaded = qwen35.load_model(tmp_path / "plain")
    assert loaded.text_config.mtp_num_hidden_layers == 1 and loaded.mtp is None
    assert not any(n.startswith("mtp.") for n in loaded.state_dict())
    assert load_mtp(loaded) is None
    with pytest.raises(RuntimeError, match="no MTP block"):
        loaded.compute_mtp_logits(torch.zeros(1, 32))
    # a partial block is a broken checkpoint, named like any other missing tensor
    partial = {k: v for k, v in head.official_state_dict().items() if "experts.3.up_proj" not in k}
    _write_folder(tmp_path / "partial", model, partial)
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) mtp\.layers\.0\.mlp\.experts\.3\.up_proj"):
        qwen35.load_model(tmp_path / "partial")


def test_mtp_tensors_of_a_config_without_mtp_layers_stay_aside(tmp_path) -> None:
    import json

    import qwen35

    model, head = _model_and_head()
    _write_folder(tmp_path, model, head.official_state_dict())
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["mtp_num_hidden_layers"] = 0
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = qwen35.load_model(tmp_path, dtype="float32")
    assert loaded.mtp is None and set(loaded.extra_tensors) == set(head.official_state_dict())


def test_draft_hidden_under_a_context_matches_the_dense_helper() -> None:
    """model.mtp_hidden_states under a context + compute_mtp_logits equal the dense draft bit for bit, step by
    step with the head's own cache, recursion included; the block's attention uses its own KV index."""
    from qwen35.model.context import DenseContext, dense_context

    class Recording(DenseContext):
        def attend(self, layer, q, k, v):
            seen.append(layer)
            return super().attend(layer, q, k, v)

    for source in ("post_norm", "pre_norm"):
        model, head = _model_and_head(source=source)
        model.mtp = head
        assert head.kv_layers == (4,)  # after the 4 main layers
        ids = torch.randint(0, 97, (2, 9))
        hidden = model(ids).hidden_states[:, :-1]
        nxt = ids[:, 1:]
        want, want_h = head.draft(model, hidden, nxt)
        seen: list[int] = []
        ctx, _ = dense_context(model.rope, nxt, dtype=model.dtype)
        ctx = Recording(rope=ctx.rope)
        x = model.mtp_hidden_states(nxt, hidden, ctx)
        assert seen == [4]
        assert torch.equal(model.compute_mtp_logits(x), want)
        assert torch.equal(head.norm(x) if source == "post_norm" else x, want_h)
        # recursion: feed the block output back unchanged with from_mtp (the head applies mtp.norm itself)
        want2, _ = head.draft(model, want_h, nxt, step=1, from_model=False)
        ctx2, _ = dense_context(model.rope, nxt, dtype=model.dtype)
        assert torch.equal(model.compute_mtp_logits(model.mtp_hidden_states(nxt, x, ctx2, 1, from_mtp=True)),
                           want2)
        # incrementally over a cache, the contexts' RoPE at the hidden states' positions
        cache = SequenceCache()
        parts = []
        for a, b in ((0, 4), (4, 5), (5, 8)):
            ctx, finish = dense_context(model.rope, nxt[:, a:b], cache, dtype=model.dtype)
            parts.append(model.compute_mtp_logits(model.mtp_hidden_states(nxt[:, a:b], hidden[:, a:b], ctx)))
            finish()
        torch.testing.assert_close(torch.cat(parts, 1), want, rtol=1e-5, atol=1e-5)
        assert set(cache.keys) == {4}


def test_mtp_router_logits_under_a_context() -> None:
    from qwen35.model.context import dense_context

    model, head = _model_and_head()
    model.mtp = head
    ids = torch.randint(0, 97, (2, 6))
    hidden = model(ids).hidden_states
    ctx, _ = dense_context(model.rope, ids, dtype=model.dtype)
    x, router = model.mtp_hidden_states_and_router(ids, hidden, ctx)
    _, _, want = head.draft_with_router(model, hidden, ids)
    assert torch.equal(router, want) and router.shape == (12, 4)


def test_embedded_model_loads_its_mtp_head() -> None:
    """The shipped model: model.mtp built by load_model, reading the hidden source it was trained with."""
    import json

    import qwen35
    from qwen35.checkpoint import saved_mtp_hidden_source
    from qwen35.llm import embedded_model_path

    path = embedded_model_path()
    model = qwen35.load_model(path)
    trained = json.loads((path / "training_info.json").read_text())["mtp_hidden_source"]
    assert isinstance(model.mtp, MTPHead) and model.mtp.hidden_source == trained == saved_mtp_hidden_source(path)
    assert not any(k.startswith("mtp.") for k in model.extra_tensors)
    assert model.mtp.fc.weight.dtype == model.dtype
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    logits, _ = model.mtp.draft(model, model(ids).hidden_states[:, :-1], ids[:, 1:])
    assert logits.shape == (1, 4, model.text_config.vocab_size) and torch.isfinite(logits).all()
