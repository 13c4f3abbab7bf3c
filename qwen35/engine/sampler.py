"""Turn one step's logits into one token per sequence, each row with its own sampling parameters.

Processing order, per row (vLLM / HF order):

1. restrict to the real vocabulary (``vocab_limit``: the embedding matrix is padded), keep only the
   tokens a request's grammar allows (``allowed_token_mask``, structured output), and block the ids
   the engine says must not come yet (``min_tokens_mask_ids``: stop ids before ``min_tokens``).  When
   the grammar and the min-tokens block together leave a row nothing, the grammar wins: it knows
   what the output must be, and a row without any token cannot be sampled at all;
2. penalties, on the tokens *generated so far* (not the prompt): repetition (positive logits divided
   by the penalty, negative ones multiplied), then frequency (``count * penalty`` subtracted) and
   presence (``penalty`` subtracted once per distinct token);
3. greedy rows (temperature 0): argmax here, nothing below changes it;
4. temperature, top-k, top-p, min-p, then one draw from the softmax.

Logprobs semantics (as vLLM's default ``raw_logprobs``): the chosen token's logprob and the top-N are
taken from ``log_softmax`` of the model's raw logits, before the grammar mask, penalties, the
min-tokens block, temperature and the top-k/top-p/min-p filters. Only the padded ids beyond
``vocab_limit`` are left out, as they are not tokens at all. So a logprob describes what the model
thinks, and is the same whatever sampling settings the request used; it is not the probability the
token was drawn with.

Reproducibility: a row with a ``torch.Generator`` draws only from its own generator, on its own row
of probabilities, so a seeded request gives the same tokens whatever else shares the batch. Rows
without one are drawn together from the global RNG. Greedy rows consume no randomness.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .params import SamplingParams


@dataclass
class SampleOutput:
    token_ids: list[int]
    logprobs: list[float | None]  # raw logprob of the chosen token; None where not requested
    # Top-N (token id, raw logprob), best first; None where not requested, [] for logprobs=0.
    top_logprobs: list[list[tuple[int, float]] | None]


class Sampler:
    """Stateless: all per-request state (generators, generated tokens) is passed in each call."""

    def __call__(
        self,
        logits: Tensor,
        params: Sequence[SamplingParams],
        generated: Sequence[Sequence[int]],
        generators: Sequence[torch.Generator | None],
        vocab_limit: int | None = None,
        min_tokens_mask_ids: Sequence[set[int] | None] | None = None,
        allowed_token_mask: Tensor | None = None,
    ) -> SampleOutput:
        """``allowed_token_mask``: bool ``[batch, n]``, True where a token may be sampled (ids >= n may not);
        rows without a constraint are all True."""
        x = _prepare(logits, params, generated, generators, vocab_limit, min_tokens_mask_ids, allowed_token_mask)
        raw = logits[:, : x.shape[1]]
        batch = x.shape[0]

        greedy = [p.greedy for p in params]
        token_ids = torch.empty(batch, dtype=torch.long, device=x.device)

        greedy_rows = [i for i in range(batch) if greedy[i]]
        if len(greedy_rows) == batch:  # the whole batch: no gathered copy of the [batch, vocab] logits
            token_ids = x.argmax(dim=-1)
        elif greedy_rows:
            idx = _index(greedy_rows, x.device)
            token_ids[idx] = x[idx].argmax(dim=-1)

        sampled_rows = [i for i in range(batch) if not greedy[i]]
        if sampled_rows:
            idx = _index(sampled_rows, x.device)
            probs = _filtered_logits(x[idx], [params[i] for i in sampled_rows]).softmax(dim=-1)
            unseeded = [j for j, i in enumerate(sampled_rows) if generators[i] is None]
            if unseeded:
                # One batched draw from the global RNG for every row without its own generator.
                j_idx = _index(unseeded, x.device)
                token_ids[idx[j_idx]] = torch.multinomial(probs[j_idx], 1).squeeze(1)
            for j, i in enumerate(sampled_rows):
                g = generators[i]
                if g is not None:
                    # Row by row, so the draw depends only on this row and its generator. A CPU
                    # generator with CUDA logits draws on the CPU: multinomial needs both on one
                    # device.
                    row = probs[j] if probs.device == g.device else probs[j].to(g.device)
                    token_ids[i] = torch.multinomial(row, 1, generator=g)[0].to(x.device)

        chosen = token_ids.tolist()
        logprobs, top = _logprobs(raw, params, chosen)
        return SampleOutput(token_ids=chosen, logprobs=logprobs, top_logprobs=top)

    def distribution(
        self,
        logits: Tensor,
        params: Sequence[SamplingParams],
        generated: Sequence[Sequence[int]],
        vocab_limit: int | None = None,
        min_tokens_mask_ids: Sequence[set[int] | None] | None = None,
        allowed_token_mask: Tensor | None = None,
    ) -> Tensor:
        """The float32 distribution ``__call__`` draws from, ``[B, min(V, vocab_limit)]``.

        Greedy rows are one-hot on their argmax. Meant for tests and debugging; the engine calls
        the sampler itself.
        """
        x = _prepare(logits, params, generated, [None] * len(params), vocab_limit, min_tokens_mask_ids,
                     allowed_token_mask)
        out = torch.zeros_like(x)
        for i, p in enumerate(params):
            if p.greedy:
                out[i, x[i].argmax()] = 1.0
            else:
                out[i] = _filtered_logits(x[i : i + 1], [p]).softmax(dim=-1)[0]
        return out


def _index(rows: list[int], device: torch.device) -> Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)


def _prepare(
    logits: Tensor,
    params: Sequence[SamplingParams],
    generated: Sequence[Sequence[int]],
    generators: Sequence[torch.Generator | None],
    vocab_limit: int | None,
    min_tokens_mask_ids: Sequence[set[int] | None] | None,
    allowed_token_mask: Tensor | None = None,
) -> Tensor:
    """Checks the arguments; returns float32 logits restricted, blocked and penalised (steps 1-2)."""
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a float tensor [batch, vocab], got {tuple(logits.shape)} {logits.dtype}")
    batch, vocab = logits.shape
    for name, seq in (("params", params), ("generated", generated), ("generators", generators)):
        if len(seq) != batch:
            raise ValueError(f"{name} has {len(seq)} entries for a batch of {batch} rows")
    if min_tokens_mask_ids is not None and len(min_tokens_mask_ids) != batch:
        raise ValueError(f"min_tokens_mask_ids has {len(min_tokens_mask_ids)} entries for a batch of {batch} rows")
    if vocab_limit is not None:
        if not 1 <= vocab_limit:
            raise ValueError(f"vocab_limit must be >= 1, got {vocab_limit}")
        vocab = min(vocab, vocab_limit)

    # Slicing drops the padded ids outright (a prefix, so ids are unchanged); the copy keeps the
    # caller's logits intact for the raw logprobs.
    x = logits[:, :vocab].to(torch.float32, copy=True)

    allowed = None
    if allowed_token_mask is not None:
        if allowed_token_mask.dim() != 2 or allowed_token_mask.shape[0] != batch:
            raise ValueError(f"allowed_token_mask must be [batch={batch}, n], got {tuple(allowed_token_mask.shape)}")
        allowed = allowed_token_mask[:, :vocab].to(device=x.device, dtype=torch.bool)
        if allowed.shape[1] < vocab:  # ids the grammar's tokenizer does not know are never allowed
            allowed = torch.cat([allowed, allowed.new_zeros(batch, vocab - allowed.shape[1])], dim=1)
        x.masked_fill_(~allowed, float("-inf"))

    if min_tokens_mask_ids is not None:
        rows, cols = [], []
        for i, ids in enumerate(min_tokens_mask_ids):
            for t in ids or ():
                if 0 <= t < vocab:
                    rows.append(i)
                    cols.append(t)
        if rows:
            before = x.clone() if allowed is not None else None
            x[_index(rows, x.device), _index(cols, x.device)] = float("-inf")
            if before is not None:
                # grammar and min-tokens block left nothing (the grammar allows only the end): the grammar wins
                empty = torch.isneginf(x).all(dim=1)
                if bool(empty.any()):
                    x[empty] = before[empty]

    _apply_penalties(x, params, generated)
    return x


def _apply_penalties(x: Tensor, params: Sequence[SamplingParams], generated: Sequence[Sequence[int]]) -> None:
    """In place. Works on (row, token) pairs, never a dense [B, V] count table, which would cost
    ~1 GB at a batch of 256 over Qwen's 248k vocabulary."""
    vocab = x.shape[1]
    flat: list[int] = []
    for i, (p, toks) in enumerate(zip(params, generated)):
        if toks and (p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0):
            flat.extend(i * vocab + t for t in toks if 0 <= t < vocab)
    if not flat:
        return
    pairs, counts = torch.unique(torch.tensor(flat, dtype=torch.long, device=x.device), return_counts=True)
    rows, cols = pairs // vocab, pairs % vocab

    def per_row(values: list[float]) -> Tensor:
        return torch.tensor(values, dtype=torch.float32, device=x.device)[rows]

    rep = per_row([p.repetition_penalty for p in params])
    presence = per_row([p.presence_penalty for p in params])
    frequency = per_row([p.frequency_penalty for p in params])

    v = x[rows, cols]
    v = torch.where(v > 0, v / rep, v * rep)
    v = v - counts.to(torch.float32) * frequency - presence
    x[rows, cols] = v


def _filtered_logits(x: Tensor, params: Sequence[SamplingParams]) -> Tensor:
    """Temperature, top-k, top-p, min-p on the rows of non-greedy requests (step 4, before the draw).
    Removed tokens get -inf. Returns a new tensor."""
    device = x.device
    vocab = x.shape[1]
    temps = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
    x = x / temps[:, None]

    use_top_k = any(p.top_k > 0 for p in params)
    use_top_p = any(p.top_p < 1.0 for p in params)
    if use_top_k or use_top_p:
        sorted_x, order = x.sort(dim=-1, descending=True)
        if use_top_k:
            k = torch.tensor([min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params], device=device)
            kth = sorted_x.gather(1, (k - 1)[:, None])
            # Ties with the k-th value are kept (as HF and vLLM do): which of equal logits to drop
            # would otherwise be arbitrary.
            sorted_x = sorted_x.masked_fill(sorted_x < kth, float("-inf"))
        if use_top_p:
            # Rows with top_p = 1 get a threshold above any sum: rounding in the cumsum must not
            # cut their tail.
            top_p = torch.tensor([p.top_p if p.top_p < 1.0 else 2.0 for p in params], device=device)
            probs = sorted_x.softmax(dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs
            # Keep the smallest head whose mass reaches top_p: a token stays while the mass
            # before it is still short of top_p. The first token always stays.
            drop = mass_before >= top_p[:, None]
            drop[:, 0] = False
            sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        x = torch.empty_like(x).scatter_(1, order, sorted_x)

    if any(p.min_p > 0.0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device)
        probs = x.softmax(dim=-1)
        threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
        x = x.masked_fill(probs < threshold, float("-inf"))
    return x


def _logprobs(
    raw: Tensor, params: Sequence[SamplingParams], chosen: list[int]
) -> tuple[list[float | None], list[list[tuple[int, float]] | None]]:
    logprobs: list[float | None] = [None] * len(params)
    top: list[list[tuple[int, float]] | None] = [None] * len(params)
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not rows:
        return logprobs, top
    idx = _index(rows, raw.device)
    lp = raw[idx].to(torch.float32).log_softmax(dim=-1)
    chosen_lp = lp.gather(1, torch.tensor([chosen[i] for i in rows], device=raw.device)[:, None])[:, 0]
    n_max = min(max(params[i].logprobs for i in rows), lp.shape[1])
    top_vals, top_ids = lp.topk(n_max, dim=-1) if n_max > 0 else (lp[:, :0], lp[:, :0].long())
    chosen_list, vals_list, ids_list = chosen_lp.tolist(), top_vals.tolist(), top_ids.tolist()
    for j, i in enumerate(rows):
        n = params[i].logprobs
        logprobs[i] = chosen_list[j]
        top[i] = list(zip(ids_list[j][:n], vals_list[j][:n]))
    return logprobs, top
