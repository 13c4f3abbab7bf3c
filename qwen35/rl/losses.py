"""RL losses: GRPO group-relative advantages and a clipped, importance-corrected policy-gradient loss.

Three policies meet in one update (the decoupled form of AReaL's PPO and slime's truncated IS):

* μ, the *behaviour* policy: the rollout engine that sampled the tokens.  Its per-token logprobs come back with
  the sample (``SamplingParams(logprobs=0)``).  It may be an older version of the weights (asynchronous
  rollouts, bounded staleness) and it is always a different program (paged, chunked engine kernels vs the
  trainer's dense forward), so it never equals the trainer exactly;
* π_prox, the *proximal* policy: the trainer's own logprobs of the same tokens at the start of the update (no
  gradient).  With one optimiser step per batch (the default) it is the current policy, detached;
* π_θ, the policy being optimised (with gradient).

Per completion token t with advantage A:

    r_t  = π_θ / π_prox                                       the PPO ratio (1 at the first step)
    w_t  = min(π_prox / μ, C)                                 truncated importance weight (C ≈ 2), no gradient
    ℓ_t  = -w_t · min(r_t A, clip(r_t, 1-ε, 1+ε) A)  +  β · KL_t(π_θ ‖ π_ref)

KL_t is the k3 estimator exp(ref - logp) - (ref - logp) - 1 (non-negative, unbiased for samples from π_θ).
The loss is a sum over the masked-in tokens; the caller divides by the step's token count (as qwen35.train
does), so every token weighs the same whatever sample it is in.  Masked out: prompt tokens (never in the
completion), tool-result tokens (not sampled by the model), and tokens from too old a policy version.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def group_advantages(rewards: torch.Tensor, normalize_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages: rewards [groups, n] (n samples of one prompt per row) -> reward minus its group's mean,
    divided by the group's standard deviation (unbiased, plus ``eps``) when ``normalize_std``.  A group whose
    samples all got the same reward has advantage 0: it carries no signal about which answer is better."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [groups, samples per group], got shape {tuple(rewards.shape)}")
    r = rewards.float()
    adv = r - r.mean(dim=1, keepdim=True)
    if normalize_std:
        if r.shape[1] < 2:
            raise ValueError("std-normalised advantages need at least 2 samples per group")
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    return adv


@dataclass
class PolicyLoss:
    loss_sum: torch.Tensor  # Σ over masked tokens of ℓ_t (divide by the step's token count)
    tokens: int  # masked-in tokens
    stats: dict[str, float]  # means over masked tokens; see policy_loss


def policy_loss(logp: torch.Tensor, behaviour_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                proximal_logp: torch.Tensor | None = None, clip_eps: float = 0.2, tis_clip: float = 2.0,
                ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0) -> PolicyLoss:
    """The loss of the module docstring over N tokens: every argument is [N] (flattened completion tokens);
    ``advantages`` is each token's sample advantage, ``mask`` (bool) which tokens count.

    stats: ``is_weight`` (mean w), ``is_ratio_max`` (largest untruncated π_prox/μ), ``is_clipped`` (share of
    tokens truncated at C), ``ppo_clipped`` (share where the clipped term was taken), ``mismatch_kl`` (k3
    estimate of KL(μ ‖ π_prox) over the sampled tokens: the trainer/rollout mismatch), ``kl_ref`` (mean KL_t,
    when a reference is given), ``logp_abs_diff_max`` (max |log π_prox - log μ|)."""
    for name, t in (("behaviour_logp", behaviour_logp), ("advantages", advantages), ("mask", mask)):
        if t.shape != logp.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, logp {tuple(logp.shape)}: give one value per token")
    if clip_eps <= 0 or tis_clip <= 0:
        raise ValueError(f"clip_eps and tis_clip must be positive, got {clip_eps} and {tis_clip}")
    keep = mask.bool()
    n = int(keep.sum())
    logp = logp.float()
    prox = (proximal_logp if proximal_logp is not None else logp).detach().float()
    mu = behaviour_logp.detach().float()
    adv = advantages.detach().float()
    ratio = torch.exp(logp - prox)
    raw_w = torch.exp(prox - mu)
    w = raw_w.clamp(max=tis_clip)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv
    pg = -torch.minimum(unclipped, clipped)
    per_token = w * pg
    kl = None
    if ref_logp is not None and kl_coef != 0.0:
        d = ref_logp.detach().float() - logp
        kl = torch.exp(d) - d - 1
        per_token = per_token + kl_coef * kl
    loss_sum = per_token[keep].sum() if n else logp.sum() * 0.0
    stats: dict[str, float] = {"tokens": float(n)}
    if n:
        with torch.no_grad():
            log_r = (prox - mu)[keep]
            stats.update(
                is_weight=float(w[keep].mean()), is_ratio_max=float(raw_w[keep].max()),
                is_clipped=float((raw_w[keep] > tis_clip).float().mean()),
                ppo_clipped=float((clipped < unclipped)[keep].float().mean()),
                mismatch_kl=float((torch.exp(log_r) - 1 - log_r).mean()),
                logp_abs_diff_max=float(log_r.abs().max()))
            if kl is not None:
                stats["kl_ref"] = float(kl[keep].mean())
    return PolicyLoss(loss_sum, n, stats)


def token_logprobs(model, input_ids: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor,
                   vocab_limit: int | None = None) -> torch.Tensor:
    """log π(targets[keep] | prefix) of a right-padded batch: input_ids [B, T], targets [B, T] (token t+1 of
    each position), keep [B, T] bool -> [n] float32, in keep's row-major order.

    The model's own forward (as qwen35.train's ``forward_losses``: the vocabulary projection runs only at the
    kept positions), then log-softmax in float32 over the first ``vocab_limit`` ids (the tokenizer's; the
    embedding may be padded) -- the definition the engine's sampler uses for logprobs."""
    out = model(input_ids, logits_to_keep=1)
    logits = model.compute_logits(out.hidden_states[keep]).float()
    if vocab_limit is not None:
        logits = logits[:, :vocab_limit]
    return -F.cross_entropy(logits, targets[keep], reduction="none")


__all__ = ["group_advantages", "policy_loss", "PolicyLoss", "token_logprobs"]
