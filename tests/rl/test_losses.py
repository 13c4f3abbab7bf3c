"""The RL losses against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from qwen35.rl.losses import group_advantages, policy_loss


def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    plain = group_advantages(r, normalize_std=False)
    assert torch.allclose(plain, torch.tensor([[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0], [-0.25, -0.25, -0.25, 0.75]]))
    # unbiased std: group 0 -> sqrt(4 * 0.25 / 3) = 0.57735; group 2 -> sqrt((3 * 0.0625 + 0.5625) / 3) = 0.5
    norm = group_advantages(r, normalize_std=True, eps=0.0 + 1e-12)
    assert torch.allclose(norm[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / math.sqrt(1 / 3), atol=1e-5)
    assert torch.allclose(norm[1], torch.zeros(4))  # one reward for all: no signal (eps keeps it finite)
    assert torch.allclose(norm[2], torch.tensor([-0.5, -0.5, -0.5, 1.5]), atol=1e-5)
    with pytest.raises(ValueError, match="groups, samples"):
        group_advantages(torch.zeros(4))


def test_policy_loss_is_weights_and_gradient_by_hand():
    # three tokens; the trainer's logprob (with grad) vs the rollout's
    logp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    mu = torch.tensor([-1.5, -0.5, -0.5])  # token 0: trainer likes it more (ratio e^0.5); token 1: e^-1.5
    adv = torch.tensor([2.0, 2.0, -1.0])
    mask = torch.tensor([True, True, False])
    out = policy_loss(logp, mu, adv, mask, clip_eps=0.2, tis_clip=1.5)
    w0 = min(math.exp(0.5), 1.5)  # 1.6487 -> truncated to 1.5
    w1 = math.exp(-1.5)  # 0.2231, below the cap
    # at the first step r = 1, so the PPO term is -A and the loss is -(w0 * 2 + w1 * 2); token 2 is masked out
    assert out.tokens == 2
    assert float(out.loss_sum.detach()) == pytest.approx(-(w0 * 2 + w1 * 2), rel=1e-6)
    out.loss_sum.backward()
    # d/dlogp of -w * r * A with r = exp(logp - logp.detach()) is -w * A
    assert logp.grad.tolist() == pytest.approx([-w0 * 2, -w1 * 2, 0.0], rel=1e-6)
    s = out.stats
    assert s["is_weight"] == pytest.approx((w0 + w1) / 2, rel=1e-6)
    assert s["is_ratio_max"] == pytest.approx(math.exp(0.5), rel=1e-6)
    assert s["is_clipped"] == pytest.approx(0.5)
    assert s["logp_abs_diff_max"] == pytest.approx(1.5)
    # k3 of KL(mu || pi): mean of (e^d - 1 - d) with d = logp - mu
    k3 = [math.exp(d) - 1 - d for d in (0.5, -1.5)]
    assert s["mismatch_kl"] == pytest.approx(sum(k3) / 2, rel=1e-6)


def test_ppo_clip_against_the_proximal_policy_by_hand():
    # a later epoch: the policy moved from the proximal one by log 1.5 (token 0) and log 0.5 (token 1)
    prox = torch.tensor([-1.0, -1.0])
    logp = (prox + torch.log(torch.tensor([1.5, 0.5]))).requires_grad_(True)
    mu = prox.clone()  # behaviour = proximal: IS weight 1
    adv = torch.tensor([1.0, -1.0])
    out = policy_loss(logp, mu, adv, torch.ones(2, dtype=torch.bool), proximal_logp=prox, clip_eps=0.2)
    # token 0: A>0, r=1.5 -> min(1.5, 1.2) * 1 = 1.2 (clipped, no gradient); token 1: A<0, r=0.5 ->
    # min(-0.5, -0.8) = -0.8 (clipped, no gradient)
    assert float(out.loss_sum.detach()) == pytest.approx(-(1.2 - 0.8), rel=1e-6)
    out.loss_sum.backward()
    assert logp.grad.tolist() == pytest.approx([0.0, 0.0], abs=1e-7)
    assert out.stats["ppo_clipped"] == pytest.approx(1.0)
    # inside the clip range the gradient is -A * r
    logp2 = (prox + torch.log(torch.tensor([1.1, 0.9]))).requires_grad_(True)
    out2 = policy_loss(logp2, mu, adv, torch.ones(2, dtype=torch.bool), proximal_logp=prox, clip_eps=0.2)
    out2.loss_sum.backward()
    assert logp2.grad.tolist() == pytest.approx([-1.1, 0.9], rel=1e-5)


def test_kl_to_reference_by_hand():
    logp = torch.tensor([-1.0], requires_grad=True)
    ref = torch.tensor([-1.5])
    out = policy_loss(logp, logp.detach(), torch.zeros(1), torch.ones(1, dtype=torch.bool), ref_logp=ref,
                      kl_coef=0.5)
    d = -0.5
    assert float(out.loss_sum.detach()) == pytest.approx(0.5 * (math.exp(d) - d - 1), rel=1e-6)
    assert out.stats["kl_ref"] == pytest.approx(math.exp(d) - d - 1, rel=1e-6)
    out.loss_sum.backward()
    # d/dlogp of exp(ref - logp) - (ref - logp) - 1 = -exp(ref - logp) + 1
    assert logp.grad.item() == pytest.approx(0.5 * (1 - math.exp(d)), rel=1e-6)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="one value per token"):
        policy_loss(torch.zeros(3), torch.zeros(2), torch.zeros(3), torch.ones(3, dtype=torch.bool))
