"""Training losses: next-token cross-entropy, the MTP (token after next) loss, the MoE load-balancing loss, and
:func:`forward_losses`, all three for one micro-batch (text, or text with pictures).

Loss masks are per *token*: ``mask[b, t]`` says whether token t is one the model should learn to produce (an
assistant span, see :func:`qwen35.train.bpe.encode_with_mask`); padding is always False.  A prediction is counted
when its *target* token is masked in: position t predicts token t+1 (main head) and token t+2 (MTP head).

The cross-entropy functions return a *sum* and a *count*, not a mean: with gradient accumulation the step's loss
is the sum over every micro-batch divided by the step's total count, so each target token weighs the same
whatever micro-batch it fell into.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from qwen35.model import Qwen35ForCausalLM
    from qwen35.model.mtp import MTPHead
    from qwen35.train.batches import Batch


def _masked_ce_sum(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of cross-entropies over masked-in positions (fp32), and how many there were."""
    keep = mask.bool()
    n = int(keep.sum())
    if n == 0:
        return logits.sum() * 0.0, 0  # keeps the graph (and the dtype) so callers can add it unconditionally
    ce = F.cross_entropy(logits[keep].float(), targets[keep], reduction="sum")
    return ce, n


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor
                    ) -> tuple[torch.Tensor, int]:
    """logits [B, T, V] of the main head, input_ids / loss_mask [B, T] -> (sum of CE, count).

    Position t predicts token t+1; it counts when ``loss_mask[:, t+1]``."""
    return _masked_ce_sum(logits[:, :-1], input_ids[:, 1:], loss_mask[:, 1:])


def selected_loss(hidden: torch.Tensor, keep: torch.Tensor, targets: torch.Tensor,
                  compute_logits: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, int, torch.Tensor]:
    """CE of the main head computed from hidden states at the kept positions only.

    hidden [B, T, H] (pre final norm), keep [B, T] bool, targets [B, T], ``compute_logits`` the model's head
    (``Qwen35ForCausalLM.compute_logits``: final norm + lm_head) -> (sum of CE, count, logits [n, V]).
    Equal to :func:`next_token_loss` on full logits when ``keep``/``targets`` are the shifted mask/ids, but
    projects onto the vocabulary only where a target is learned (a third of the tokens in chat data)."""
    n = int(keep.sum())
    logits = compute_logits(hidden[keep])
    if n == 0:
        return logits.sum() * 0.0, 0, logits
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum"), n, logits


def mtp_inputs(hidden: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the MTP head reads for the loss: hidden states at t = 0..T-3 and tokens t+1 (so that every MTP
    prediction, of token t+2, has a target)."""
    T = input_ids.shape[1]
    return hidden[:, : T - 2], input_ids[:, 1: T - 1]


def mtp_loss(mtp_logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor
             ) -> tuple[torch.Tensor, int]:
    """mtp_logits [B, T-2, V] (from :func:`mtp_inputs`) -> (sum of CE against token t+2, count).

    Counts a position when ``loss_mask[:, t+2]``."""
    return _masked_ce_sum(mtp_logits, input_ids[:, 2:], loss_mask[:, 2:])


def load_balancing_loss(router_logits: Sequence[torch.Tensor], num_experts: int, top_k: int,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-Transformer balance loss over all MoE layers, equal to transformers' ``load_balancing_loss_func``.

        loss = E · Σ_e f_e · P_e
        f_e = share of (token, top-k slot) assignments that went to expert e, over all layers' tokens
        P_e = mean router probability of expert e, over all layers' tokens

    router_logits: one [N, E] tensor per MoE layer, all over the same N = B*T tokens; attention_mask [B, T]
    (1 = token, 0 = padding) drops padding from both averages.  The top-k counts carry no gradient; the gradient
    flows through P.  Note f_e sums to top_k, so a perfectly balanced router gives top_k, not 1.
    """
    if not router_logits:
        raise ValueError("no router logits: the model has no MoE layer")
    device = router_logits[0].device
    weight = None if attention_mask is None else attention_mask.reshape(-1).to(device=device, dtype=torch.float32)
    counts = torch.zeros(num_experts, dtype=torch.float32, device=device)
    prob_sum = torch.zeros(num_experts, dtype=torch.float32, device=device)
    rows = torch.zeros((), dtype=torch.float32, device=device)
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        chosen = probs.topk(top_k, dim=-1).indices  # [N, k]
        hits = F.one_hot(chosen, num_experts).sum(1).float()  # [N, E]: 1 where the token chose expert e
        if weight is None:
            counts = counts + hits.sum(0)
            prob_sum = prob_sum + probs.sum(0)
            rows = rows + probs.shape[0]
        else:
            counts = counts + (hits * weight[:, None]).sum(0)
            prob_sum = prob_sum + (probs * weight[:, None]).sum(0)
            rows = rows + weight.sum()
    return num_experts * ((counts / rows) * (prob_sum / rows)).sum()


# ----------------------------------------------------------------------------------------------------------------
# the losses of a micro-batch, as every trainer in qwen35.train takes them


@dataclass
class StepLosses:
    main_sum: torch.Tensor
    main_n: int
    mtp_sum: torch.Tensor | None
    mtp_n: int
    balance: torch.Tensor | None  # main MoE layers (transformers' definition)
    mtp_balance: torch.Tensor | None
    mtp_correct: int = 0  # MTP top-1 hits on masked targets (for eval)
    main_correct: int = 0


def forward_losses(model: Qwen35ForCausalLM, head: MTPHead | None, batch: Batch, autocast: bool = False,
                   count_correct: bool = False, pixel_values: torch.Tensor | None = None,
                   image_grid_thw: torch.Tensor | None = None) -> StepLosses:
    """Losses of one micro-batch.  The vocabulary projection runs only where a target is learned (the model is
    asked for one position of logits; the rest come from its hidden states), which is the same loss as full
    logits at a fraction of the cost: chat data has a loss mask on about a third of the tokens.

    ``head`` is the MTP head trained with the model: ``model.mtp`` in a run, one beside a frozen trunk, or None
    (no MTP loss).  Rows with pictures pass their ``pixel_values`` / ``image_grid_thw`` (transformers' names):
    the main model then runs at M-RoPE positions, while the MTP head reads its hidden states at plain positions,
    as the engine's MTP drafter runs it."""
    cfg = model.text_config
    T = batch.ids.shape[1]
    pictures = {} if pixel_values is None else {"pixel_values": pixel_values, "image_grid_thw": image_grid_thw}
    with torch.autocast(batch.ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = model(batch.ids, logits_to_keep=1, **pictures)
        keep = batch.loss_mask[:, 1:]  # position t predicts token t+1
        main_sum, main_n, logits = selected_loss(out.hidden_states[:, :-1], keep, batch.ids[:, 1:],
                                                 model.compute_logits)
        res = StepLosses(main_sum, main_n, None, 0, None, None)
        if count_correct:
            res.main_correct = int((logits.argmax(-1) == batch.ids[:, 1:][keep]).sum())
        if cfg.is_moe and out.router_logits:
            res.balance = load_balancing_loss(out.router_logits, cfg.num_experts, cfg.num_experts_per_tok,
                                              batch.valid)
        if head is not None and T >= 3:
            hidden, nxt = mtp_inputs(out.hidden_states, batch.ids)
            keep2 = batch.loss_mask[:, 2:]  # MTP position t predicts token t+2
            logits2, _, router = head.draft_with_router(model, hidden, nxt, logits_at=keep2)
            targets2 = batch.ids[:, 2:][keep2]
            res.mtp_n = int(keep2.sum())
            res.mtp_sum = F.cross_entropy(logits2.float(), targets2, reduction="sum") if res.mtp_n else \
                logits2.sum() * 0.0
            if router is not None:
                res.mtp_balance = load_balancing_loss([router], cfg.num_experts, cfg.num_experts_per_tok,
                                                      batch.valid[:, : T - 2])
            if count_correct:
                res.mtp_correct = int((logits2.argmax(-1) == targets2).sum())
    return res


@torch.no_grad()
def evaluate_loss(model: Qwen35ForCausalLM, head: MTPHead | None, batches: Sequence[Batch],
                  autocast: bool = False) -> dict[str, float]:
    """Held-out masked CE of both heads (nats per target token) and top-1 accuracies."""
    was_training = model.training
    model.eval()
    main = mtp = 0.0
    n_main = n_mtp = c_main = c_mtp = 0
    for b in batches:
        r = forward_losses(model, head, b, autocast, count_correct=True)
        main += float(r.main_sum)
        n_main += r.main_n
        c_main += r.main_correct
        if r.mtp_sum is not None:
            mtp += float(r.mtp_sum)
            n_mtp += r.mtp_n
            c_mtp += r.mtp_correct
    model.train(was_training)
    out = {"loss": main / max(n_main, 1), "accuracy": c_main / max(n_main, 1)}
    if n_mtp:
        out.update(mtp_loss=mtp / n_mtp, mtp_accuracy=c_mtp / n_mtp)
    return out


__all__ = ["next_token_loss", "selected_loss", "mtp_inputs", "mtp_loss", "load_balancing_loss", "StepLosses",
           "forward_losses", "evaluate_loss"]
