"""Our forward vs transformers' on checkpoints transformers itself wrote (float32, random weights)."""

from __future__ import annotations

import pytest
import torch

import qwen35
from qwen35.model import SequenceCache
from tests.hf_oracle import build_hf, hf_logits, save_hf

LENGTHS = (1, 2, 63, 64, 65, 200)

CASES = {
    # name: (moe, multimodal, tie, overrides)
    "dense-text-tied": (False, False, True, {}),
    "dense-mm-untied": (False, True, False, {}),
    "moe-text-untied": (True, False, False, {}),
    "moe-mm-tied": (True, True, True, dict(num_attention_heads=2, num_key_value_heads=1)),
    "dense-interval2-wide": (False, False, False, dict(num_hidden_layers=4, layer_types=None,
                                                        full_attention_interval=2, linear_num_key_heads=1,
                                                        linear_num_value_heads=3, linear_key_head_dim=24,
                                                        linear_value_head_dim=16, num_key_value_heads=4)),
    "moe-16experts-top4": (True, False, False, dict(num_experts=16, num_experts_per_tok=4, num_hidden_layers=5)),
    "dense-yarn": (False, False, False, dict(rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, partial_rotary_factor=0.5, mrope_section=[3, 3, 2],
        mrope_interleaved=True, factor=4.0, original_max_position_embeddings=64))),
}


def assert_close_logits(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> None:
    scale = ref.abs().max().item()
    err = (ours - ref).abs().max().item()
    assert err <= rel * scale, f"max|Δ| {err:.3g} > {rel} × logit scale {scale:.3g}"


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    moe, mm, tie, over = CASES[request.param]
    over = dict(over)
    if over.get("layer_types", 0) is None:
        over.pop("layer_types")
    ref = build_hf(moe, mm, tie, **over)
    path = save_hf(ref, tmp_path_factory.mktemp(request.param))
    return ref, qwen35.load_model(path, dtype="float32"), path


def test_logits_match_transformers(pair):
    ref, ours, _ = pair
    torch.manual_seed(1)
    for T in LENGTHS:
        ids = torch.randint(0, ours.config.text.vocab_size, (2, T))
        with torch.no_grad():
            assert_close_logits(ours(ids).logits, hf_logits(ref, ids))


def test_incremental_decode_equals_full_forward(pair):
    _, ours, _ = pair
    ids = torch.randint(0, ours.config.text.vocab_size, (2, 70), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = ours(ids).logits
        for split in (1, 64, 65):
            cache = SequenceCache()
            parts = [ours(ids[:, :split], cache=cache).logits]
            parts += [ours(ids[:, t:t + 1], cache=cache).logits for t in range(split, ids.shape[1])]
            assert_close_logits(torch.cat(parts, 1), full)


def test_greedy_continuation_matches_transformers(pair):
    ref, ours, _ = pair
    prompt = torch.randint(0, ours.config.text.vocab_size, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, do_sample=False, min_new_tokens=32,
                            eos_token_id=None, pad_token_id=0)[0, 9:].tolist()
        cache = SequenceCache()
        logits = ours(prompt, cache=cache).logits
        got = []
        for _ in range(32):
            nxt = int(logits[0, -1].argmax())
            got.append(nxt)
            logits = ours(torch.tensor([[nxt]]), cache=cache).logits
    assert got == want


def test_left_padded_batch_rows_equal_solo_rows(pair):
    _, ours, _ = pair
    g = torch.Generator().manual_seed(4)
    lengths = [5, 66, 1, 30]
    V = ours.config.text.vocab_size
    seqs = [torch.randint(0, V, (n,), generator=g) for n in lengths]
    L = max(lengths)
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, L - len(s):] = s
        mask[i, L - len(s):] = 1
    with torch.no_grad():
        cache = SequenceCache()
        batch = ours(ids, attention_mask=mask, cache=cache).logits
        step_ids = torch.randint(0, V, (len(seqs), 1), generator=g)
        step = ours(step_ids, cache=cache).logits
        for i, s in enumerate(seqs):
            solo_cache = SequenceCache()
            solo = ours(s[None], cache=solo_cache).logits
            assert_close_logits(batch[i, L - len(s):], solo[0])
            assert_close_logits(step[i], ours(step_ids[i:i + 1], cache=solo_cache).logits[0])


def test_save_roundtrip_loads_identically_in_both(pair, tmp_path):
    import transformers

    ref, ours, _ = pair
    ours.save_pretrained(tmp_path)
    again = qwen35.load_model(tmp_path, dtype="float32")
    ids = torch.randint(0, ours.config.text.vocab_size, (1, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b = ours(ids).logits, again(ids).logits
        assert torch.equal(a, b)
        hf_cls = type(ref)
        back = hf_cls.from_pretrained(tmp_path, dtype=torch.float32).eval()
        assert_close_logits(hf_logits(back, ids), a)
    assert set(again.extra_tensors) == set(ours.extra_tensors)


def test_bfloat16_error_no_worse_than_transformers_bfloat16(pair, cpu_kind):
    """In bf16 both implementations round differently from the fp32 truth. Ours must stay within 1.5x the
    reference's own bf16 error (plus 2% of the logit scale for noise): the same precision, not bit-equality."""
    ref, _, path = pair
    import transformers  # noqa: F401

    ids = torch.randint(0, 160, (2, 65), generator=torch.Generator().manual_seed(6))
    truth = hf_logits(ref, ids)
    ours = qwen35.load_model(path, dtype="bfloat16")
    ref_bf16 = type(ref).from_pretrained(path, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        ours_err = (ours(ids).logits.float() - truth).abs().max().item()
    ref_err = (hf_logits(ref_bf16, ids).float() - truth).abs().max().item()
    scale = truth.abs().max().item()
    assert ours_err <= 1.5 * ref_err + 0.02 * scale, (ours_err, ref_err, scale)


def test_bfloat16_decode_steps_error_no_worse_than_transformers_bfloat16(pair, cpu_kind):
    """One-token decode steps take the few-row bf16 path (the native kernel where it builds): their logits stay
    as close to the fp32 truth as transformers' own bf16 forward of the same positions."""
    ref, _, path = pair
    ids = torch.randint(0, 160, (1, 40), generator=torch.Generator().manual_seed(7))
    truth = hf_logits(ref, ids)[:, 32:]
    ours = qwen35.load_model(path, dtype="bfloat16")
    ref_bf16 = type(ref).from_pretrained(path, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        cache = SequenceCache()
        ours(ids[:, :32], cache=cache)
        steps = torch.cat([ours(ids[:, t:t + 1], cache=cache).logits for t in range(32, 40)], dim=1)
    ours_err = (steps.float() - truth).abs().max().item()
    ref_err = (hf_logits(ref_bf16, ids)[:, 32:].float() - truth).abs().max().item()
    scale = truth.abs().max().item()
    assert ours_err <= 1.5 * ref_err + 0.02 * scale, (ours_err, ref_err, scale)
