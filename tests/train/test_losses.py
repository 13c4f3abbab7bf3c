"""Training losses: the balance loss equals transformers' ``load_balancing_loss_func`` (value and gradient, with and
without a padding mask); the cross-entropies count the right targets (t+1 main, t+2 MTP) under the loss mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwen35.train.losses import load_balancing_loss, mtp_inputs, mtp_loss, next_token_loss, selected_loss

torch.set_num_threads(1)


def _router_logits(layers: int, B: int, T: int, E: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B * T, E, generator=g) * 2).requires_grad_(True) for _ in range(layers)]


@pytest.mark.parametrize("E,k", [(8, 2), (4, 1), (16, 4)])
@pytest.mark.parametrize("masked", [False, True])
def test_balance_loss_equals_transformers(E: int, k: int, masked: bool) -> None:
    hf = pytest.importorskip("transformers.models.qwen3_5_moe.modeling_qwen3_5_moe")
    B, T = 3, 7
    logits = _router_logits(3, B, T, E, seed=E + k)
    mask = None
    if masked:  # left and right padding of different lengths, as a padded batch has
        mask = torch.ones(B, T, dtype=torch.long)
        mask[0, :2] = 0
        mask[2, 5:] = 0
    ours = load_balancing_loss(logits, E, k, mask)
    ref = hf.load_balancing_loss_func(tuple(logits), E, k, mask)
    torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=1e-7)
    g_ours = torch.autograd.grad(ours, logits)
    g_ref = torch.autograd.grad(ref, logits)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_balance_loss_ignores_padding_rows() -> None:
    """Masked rows may hold anything: the loss equals the loss over the real rows alone."""
    E, k = 6, 2
    real = _router_logits(2, 1, 5, E, seed=3)
    junk = torch.randn(3, E) * 50
    padded = [torch.cat([x, junk]) for x in real]
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])
    torch.testing.assert_close(load_balancing_loss(padded, E, k, mask), load_balancing_loss(real, E, k))


def test_balance_loss_extremes() -> None:
    E, k, N = 4, 1, 400
    # a router that sends everything to one expert with certainty: f = (1, 0, 0, 0), P = (1, 0, 0, 0) -> E
    collapsed = torch.full((N, E), -1e4)
    collapsed[:, 0] = 1e4
    assert load_balancing_loss([collapsed], E, k).item() == pytest.approx(E)
    # uniform probabilities with exactly balanced choices: f = P = 1/E -> k (= 1 here)
    balanced = torch.eye(E).repeat(N // E, 1) * 1e-4
    assert load_balancing_loss([balanced], E, k).item() == pytest.approx(1.0, rel=1e-3)
    with pytest.raises(ValueError):
        load_balancing_loss([], E, k)


def test_next_token_loss_counts_masked_targets() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    ids = torch.randint(0, 11, (2, 5), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    total, n = next_token_loss(logits, ids, mask)
    want = sum(F.cross_entropy(logits[b, t - 1], ids[b, t], reduction="sum")
               for b in range(2) for t in range(1, 5) if mask[b, t])
    assert n == 6
    torch.testing.assert_close(total, want)


def test_mtp_loss_targets_token_after_next() -> None:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 13, (2, 6), generator=g)
    hidden = torch.randn(2, 6, 4, generator=g)
    h, nxt = mtp_inputs(hidden, ids)
    assert torch.equal(h, hidden[:, :4]) and torch.equal(nxt, ids[:, 1:5])
    logits = torch.randn(2, 4, 13, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 1, 1], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    total, n = mtp_loss(logits, ids, mask)
    want = sum(F.cross_entropy(logits[b, t], ids[b, t + 2], reduction="sum")
               for b in range(2) for t in range(4) if mask[b, t + 2])
    assert n == 4
    torch.testing.assert_close(total, want)


def test_empty_mask_gives_zero_with_graph() -> None:
    logits = torch.randn(1, 4, 7, requires_grad=True)
    total, n = next_token_loss(logits, torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.bool))
    assert n == 0 and total.item() == 0.0
    total.backward()  # still differentiable, so a step can add it unconditionally
    assert logits.grad is not None and not logits.grad.any()


def test_selected_loss_equals_full_logits_loss() -> None:
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(8)
    head = torch.nn.Linear(8, 19, bias=False)
    hidden = torch.randn(3, 6, 8)
    ids = torch.randint(0, 19, (3, 6))
    mask = torch.rand(3, 6) > 0.4
    full, n_full = next_token_loss(head(norm(hidden)), ids, mask)
    part, n_part, logits = selected_loss(hidden[:, :-1], mask[:, 1:], ids[:, 1:], lambda h: head(norm(h)))
    assert n_full == n_part == logits.shape[0]
    torch.testing.assert_close(part, full, rtol=1e-6, atol=1e-5)


def _tiny_vision_model():
    from qwen35.config import config_from_dict
    from qwen35.model import Qwen35ForCausalLM, init_weights
    from qwen35.train.presets import model_preset

    text = {**model_preset("tiny"), "vocab_size": 64}
    body = {"model_type": "qwen3_5_moe", "text_config": text,
            "vision_config": {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                              "in_channels": 3, "patch_size": 16, "temporal_patch_size": 2,
                              "spatial_merge_size": 2, "num_position_embeddings": 16, "out_hidden_size": 64},
            "image_token_id": 60, "video_token_id": 61, "vision_start_token_id": 62, "vision_end_token_id": 63}
    torch.manual_seed(0)
    model = Qwen35ForCausalLM(config_from_dict(body, source="test"), vision=True, mtp=True)
    init_weights(model)
    return model.eval()


@pytest.mark.parametrize("pictures", [False, True])
def test_forward_losses_equal_full_logit_losses(pictures: bool) -> None:
    """The trainers' one loss path (forward_losses: vocabulary projection at learned positions only) equals the
    losses of full logits, for text rows and for rows with a picture (M-RoPE positions in the main model)."""
    from qwen35.train.batches import Batch
    from qwen35.train.losses import forward_losses

    model = _tiny_vision_model()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 56, (2, 14), generator=g)
    kw = {}
    if pictures:  # one 32x32 picture per row: 2x2 patches merge into one token
        ids[:, 3], ids[:, 4], ids[:, 5] = 62, 60, 63
        kw = {"pixel_values": torch.randn(8, 3 * 2 * 16 * 16, generator=g),
              "image_grid_thw": torch.tensor([[1, 2, 2], [1, 2, 2]])}
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 7:] = True
    mask[1, 12:] = False  # a shorter row: its last tokens are padding
    valid = torch.ones_like(mask)
    valid[1, 12:] = False
    batch = Batch(ids, mask, valid)
    with torch.no_grad():
        got = forward_losses(model, model.mtp, batch, count_correct=True, **kw)
        out = model(ids, **kw)
        want_main, n_main = next_token_loss(out.logits, ids, mask)
        hidden, nxt = mtp_inputs(out.hidden_states, ids)
        mtp_logits, _ = model.mtp.draft(model, hidden, nxt)
        want_mtp, n_mtp = mtp_loss(mtp_logits, ids, mask)
    assert got.main_n == n_main and got.mtp_n == n_mtp
    torch.testing.assert_close(got.main_sum, want_main, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.mtp_sum, want_mtp, rtol=1e-5, atol=1e-5)
    keep = mask[:, 1:]
    assert got.main_correct == int((out.logits[:, :-1].argmax(-1) == ids[:, 1:])[keep].sum())
    assert got.balance is not None and got.mtp_balance is not None
    if pictures:  # the picture reaches the loss
        with torch.no_grad():
            other = forward_losses(model, None, batch, pixel_values=kw["pixel_values"] * -1.0,
                                   image_grid_thw=kw["image_grid_thw"])
        assert other.mtp_sum is None and abs(float(other.main_sum - got.main_sum)) > 1e-4
