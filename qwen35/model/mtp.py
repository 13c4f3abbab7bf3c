"""The multi-token-prediction (MTP) head: one extra decoder block that drafts the token after next.

    e = pre_fc_norm_embedding(embed(token_{t+1}))        shared embedding of the main model
    h = pre_fc_norm_hidden(hidden_t)                      hidden state of the main model at position t
    x = fc([e | h])                                       Linear(2H -> H), embedding half first
    x = layers.k(x)                                       a full-attention decoder block (own KV)
    logits_{t+2} = lm_head(norm(x))                       shared lm_head

The head is the child module ``model.mtp`` of a :class:`~qwen35.model.Qwen35ForCausalLM` (built by ``load_model``
when the config has MTP layers and the folder holds their weights).  Parameter names are the official ones under
the top-level ``mtp.`` prefix (``mtp.fc.weight``, ``mtp.layers.0.self_attn.q_proj.weight`` ...), so the model's
state dict, the checkpoint loader and :meth:`MTPHead.official_state_dict` all use the names official checkpoints
hold (:meth:`MTPHead.load_official` reads a loose set of them, experts fused or per expert).

Position t of the MTP sequence uses RoPE position t, the position of the hidden state it reads (as vLLM does).
Layer k keeps its KV under index ``num_hidden_layers + k`` of the context (:attr:`MTPHead.kv_layers`), after the
main stack's layers.  The head holds no request state.  With several MTP layers, draft step ``k`` uses layer
``k % n`` (vLLM's recursion rule).

``hidden_source`` says which hidden state of the main model the head reads:

* ``"post_norm"`` — after the main model's final norm (what vLLM / SGLang feed the official MTP block);
* ``"pre_norm"`` — the last decoder layer output before it (``Qwen35ForCausalLM.hidden_states``).

Callers pass pre-norm tensors and the head applies the norm itself when it reads post-norm states: the main
model's final norm on the main model's hidden states, its own ``mtp.norm`` on its own block output.

Two ways to run it:

* under any :class:`ForwardContext` (the engine's paged one): :meth:`MTPHead.draft_hidden` returns the block output
  *before* ``mtp.norm``; :meth:`MTPHead.compute_logits` applies ``mtp.norm`` and the shared lm_head.  The model
  wraps both with its own embedding, final norm and lm_head (``Qwen35ForCausalLM.mtp_hidden_states`` /
  ``compute_mtp_logits``).
* densely, for tests and training: :meth:`MTPHead.forward` / :meth:`MTPHead.draft` build a ``DenseContext``
  (optionally over the head's own :class:`SequenceCache`, never the main model's) and return the logits plus the
  hidden state for the next draft step in the form it reads (post ``mtp.norm`` for "post_norm", before it for
  "pre_norm").
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..config import TextConfig
from .context import ForwardContext, SequenceCache, dense_context
from .decoder import DecoderLayer
from .norm import RMSNorm
from .rope import RotaryEmbedding

if TYPE_CHECKING:  # pragma: no cover
    from .transformer import Qwen35ForCausalLM

HIDDEN_SOURCES = ("pre_norm", "post_norm")
DEFAULT_HIDDEN_SOURCE = "post_norm"
PREFIX = "mtp."
_PER_EXPERT = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def mtp_text_config(cfg: TextConfig) -> TextConfig:
    """The main config with the decoder replaced by the MTP block's: every layer full attention, same FFN."""
    n = max(cfg.mtp_num_hidden_layers, 1)
    return dataclasses.replace(cfg, layer_types=("full_attention",) * n, num_hidden_layers=n)


class MTPHead(nn.Module):
    """One official-layout MTP block (``mtp.*``); embedding, final norm and lm_head are the main model's, passed
    in (the head never holds the model: it is the model's child)."""

    def __init__(self, cfg: TextConfig, hidden_source: str = DEFAULT_HIDDEN_SOURCE) -> None:
        super().__init__()
        if hidden_source not in HIDDEN_SOURCES:
            raise ValueError(f"hidden_source must be one of {HIDDEN_SOURCES}, got {hidden_source!r}")
        self.hidden_source = hidden_source
        self.config = mtp_text_config(cfg)
        n = self.config.num_hidden_layers
        # after the main stack's layer indices, so the MTP KV never collides with a main layer's in one cache
        self.kv_layers: tuple[int, ...] = tuple(cfg.num_hidden_layers + k for k in range(n))
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.fc = nn.Linear(2 * h, h, bias=False)
        self.pre_fc_norm_embedding = RMSNorm(h, eps)
        self.pre_fc_norm_hidden = RMSNorm(h, eps)
        self.layers = nn.ModuleList(DecoderLayer(self.config, k, cache_index=self.kv_layers[k]) for k in range(n))
        self.norm = RMSNorm(h, eps)

    @classmethod
    def for_model(cls, model: Qwen35ForCausalLM, hidden_source: str = DEFAULT_HIDDEN_SOURCE) -> MTPHead:
        """A freshly initialised head matching ``model`` (same dtype and device); load weights separately."""
        head = cls(model.text_config, hidden_source)
        return head.to(device=model.device, dtype=model.dtype)

    # ------------------------------------------------------------------------------------------------------
    # running under a context

    def combine(self, next_ids: torch.Tensor, hidden: torch.Tensor, embed: Callable[[torch.Tensor], torch.Tensor],
                final_norm: nn.Module | None = None, from_mtp: bool = False) -> torch.Tensor:
        """fc([pre_fc_norm_embedding(embed(next_ids)) | pre_fc_norm_hidden(hidden')]) -> [B, T, H], the block's
        input.  hidden' is ``hidden`` normed as the hidden source asks: with "post_norm", ``final_norm`` (the
        main model's, None = already normed) or, ``from_mtp``, this head's own ``mtp.norm``; with "pre_norm",
        as given."""
        if hidden.dim() != 3 or next_ids.shape != hidden.shape[:2]:
            raise ValueError(f"hidden must be [B, T, H] and next_ids [B, T]; got {tuple(hidden.shape)} and "
                             f"{tuple(next_ids.shape)}")
        if self.hidden_source == "post_norm":
            norm = self.norm if from_mtp else final_norm
            if norm is not None:
                hidden = norm(hidden)
        e = self.pre_fc_norm_embedding(embed(next_ids))
        return self.fc(torch.cat([e, self.pre_fc_norm_hidden(hidden)], dim=-1))

    def block(self, x: torch.Tensor, ctx: ForwardContext, step: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Layer ``step % n`` on the block input -> (output before ``mtp.norm``, router logits or None)."""
        return self.layers[step % len(self.layers)](x, ctx)

    def draft_hidden_and_router(
        self, next_ids: torch.Tensor, hidden: torch.Tensor, ctx: ForwardContext,
        embed: Callable[[torch.Tensor], torch.Tensor], final_norm: nn.Module | None = None, step: int = 0,
        from_mtp: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`draft_hidden` plus the block's router logits [B*T, E] (None for a dense FFN)."""
        return self.block(self.combine(next_ids, hidden, embed, final_norm, from_mtp), ctx, step)

    def draft_hidden(
        self, next_ids: torch.Tensor, hidden: torch.Tensor, ctx: ForwardContext,
        embed: Callable[[torch.Tensor], torch.Tensor], final_norm: nn.Module | None = None, step: int = 0,
        from_mtp: bool = False,
    ) -> torch.Tensor:
        """One draft step under ``ctx`` -> the MTP block output [B, T, H], **before** ``mtp.norm``.

        next_ids [B, T]: the token after each hidden state's position; hidden [B, T, H]: pre-norm hidden states,
        the main model's (``final_norm`` is its final norm) or, with ``from_mtp=True``, this method's previous
        output (the head applies ``mtp.norm`` to it itself when it reads post-norm states).  ``ctx.rope`` must
        be the RoPE of the hidden states' positions, and ``ctx.attend`` is called with the index in
        :attr:`kv_layers` of layer ``step % n``.  Logits: :meth:`compute_logits` on the result; the next step
        feeds the result back unchanged with ``from_mtp=True``."""
        return self.draft_hidden_and_router(next_ids, hidden, ctx, embed, final_norm, step, from_mtp)[0]

    def compute_logits(self, x: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        """Block output [..., H] (from :meth:`draft_hidden`) -> logits [..., vocab]: ``lm_head(mtp.norm(x))``."""
        return lm_head(self.norm(x))

    # ------------------------------------------------------------------------------------------------------
    # running densely (tests, training, evaluation)

    def forward(
        self,
        hidden: torch.Tensor,
        next_ids: torch.Tensor,
        embed: nn.Embedding,
        lm_head: nn.Module,
        rope: RotaryEmbedding,
        cache: SequenceCache | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        final_norm: nn.Module | None = None,
        step: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [B, T, H] (main model, pre-norm — or this head's own previous output when drafting
        recursively), next_ids [B, T] the token after each hidden's position -> (logits [B, T, vocab] for the
        token after that, mtp_hidden [B, T, H] for the next draft step).

        ``final_norm`` is the main model's final norm, needed with ``hidden_source="post_norm"`` when ``hidden``
        comes from the main model (pass None when feeding back this head's own output).  ``position_ids`` and
        ``attention_mask`` follow ``Qwen35ForCausalLM.forward``: by default position t of the call is the
        cache's next position + t, i.e. the positions of the hidden states; ``attention_mask`` marks which
        *hidden states* are real (for a left-padded batch: the main model's mask without its last column).
        """
        logits, out, _ = self.forward_with_router(hidden, next_ids, embed, lm_head, rope, cache, position_ids,
                                                  attention_mask, final_norm, step)
        return logits, out

    def forward_with_router(
        self,
        hidden: torch.Tensor,
        next_ids: torch.Tensor,
        embed: nn.Embedding,
        lm_head: nn.Module,
        rope: RotaryEmbedding,
        cache: SequenceCache | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        final_norm: nn.Module | None = None,
        step: int = 0,
        logits_at: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """:meth:`forward` plus the block's router logits [B*T, E] (None for a dense FFN), for the balance loss.

        ``logits_at`` [B, T] bool computes the logits of those positions only ([n, vocab], row-major order):
        training needs them only where there is a target, and the vocabulary projection is a large share of the
        work for a small model."""
        x = self.combine(next_ids, hidden, embed, final_norm)
        # the context after fc: its RoPE tables take the block input's dtype (bf16 under autocast)
        ctx, finish = dense_context(rope, x, cache, position_ids, attention_mask)
        x, router_logits = self.block(x, ctx, step)
        finish()
        normed = self.norm(x)
        out = normed if self.hidden_source == "post_norm" else x
        logits = lm_head(normed if logits_at is None else normed[logits_at])
        return logits, out, router_logits

    def draft(self, model: Qwen35ForCausalLM, hidden: torch.Tensor, next_ids: torch.Tensor,
              cache: SequenceCache | None = None, step: int = 0, from_model: bool = True,
              attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` with the embedding, lm_head, RoPE and final norm taken from ``model``.

        ``from_model``: ``hidden`` is the main model's (pre-norm) output; False when it is this head's own
        output from the previous draft step."""
        logits, out, _ = self.draft_with_router(model, hidden, next_ids, cache, step, from_model, attention_mask)
        return logits, out

    def draft_with_router(self, model: Qwen35ForCausalLM, hidden: torch.Tensor, next_ids: torch.Tensor,
                          cache: SequenceCache | None = None, step: int = 0, from_model: bool = True,
                          attention_mask: torch.Tensor | None = None, logits_at: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """:meth:`draft` plus router logits, with :meth:`forward_with_router`'s ``logits_at`` (training)."""
        return self.forward_with_router(hidden, next_ids, model.model.embed_tokens, model.lm_head, model.rope,
                                        cache=cache, attention_mask=attention_mask,
                                        final_norm=model.model.norm if from_model else None, step=step,
                                        logits_at=logits_at)

    # ------------------------------------------------------------------------------------------------------
    # official checkpoint layout

    def official_state_dict(self, per_expert: bool = True) -> dict[str, torch.Tensor]:
        """``mtp.*`` tensors as official checkpoints name them. Official Qwen3.5 MoE checkpoints store the MTP
        experts per expert (2-D ``experts.N.{gate,up,down}_proj.weight``); ``per_expert=False`` keeps them fused
        (``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj`` [E, H, I]) as Qwen3.6 does."""
        out: dict[str, torch.Tensor] = {}
        for name, t in self.state_dict().items():
            t = t.detach()
            if per_expert and name.endswith("mlp.experts.gate_up_proj"):
                base = name[: -len("gate_up_proj")]
                inter = t.shape[1] // 2
                for e in range(t.shape[0]):
                    out[f"{PREFIX}{base}{e}.gate_proj.weight"] = t[e, :inter].contiguous()
                    out[f"{PREFIX}{base}{e}.up_proj.weight"] = t[e, inter:].contiguous()
            elif per_expert and name.endswith("mlp.experts.down_proj"):
                base = name[: -len("down_proj")]
                for e in range(t.shape[0]):
                    out[f"{PREFIX}{base}{e}.down_proj.weight"] = t[e].contiguous()
            else:
                out[PREFIX + name] = t.contiguous()
        return out

    @torch.no_grad()
    def load_official(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Load ``mtp.*`` tensors (other names are ignored), experts fused or per expert; every weight of the
        head must be covered, shapes must match."""
        own = self.state_dict()
        fused: dict[str, torch.Tensor] = {}
        covered: dict[str, set] = {}
        for full, t in tensors.items():
            if not full.startswith(PREFIX):
                continue
            name = full[len(PREFIX):]
            m = _PER_EXPERT.match(name)
            if m:
                layer, e, part = m.group(1), int(m.group(2)), m.group(3)
                target = f"layers.{layer}.mlp.experts.{'down_proj' if part == 'down_proj' else 'gate_up_proj'}"
                if target not in own:
                    raise KeyError(f"{full}: this MTP head has no {target}")
                dst = fused.setdefault(target, own[target].clone())
                inter = dst.shape[-1] if part == "down_proj" else dst.shape[1] // 2
                view = dst[e] if part == "down_proj" else dst[e, :inter] if part == "gate_proj" else dst[e, inter:]
                if view.shape != t.shape:
                    raise ValueError(f"{full} has shape {list(t.shape)}, expected {list(view.shape)}")
                view.copy_(t)
                covered.setdefault(target, set()).add((e, part))
            elif name in own:
                if own[name].shape != t.shape:
                    raise ValueError(f"{full} has shape {list(t.shape)}, expected {list(own[name].shape)}")
                fused[name] = t
                covered.setdefault(name, set()).add("all")
            else:
                raise KeyError(f"unexpected MTP tensor {full}")
        n_exp = self.config.num_experts
        missing = []
        for name in own:
            have = covered.get(name, set())
            if "all" in have:
                continue
            if name.endswith("experts.gate_up_proj"):
                need = {(e, p) for e in range(n_exp) for p in ("gate_proj", "up_proj")}
            elif name.endswith("experts.down_proj"):
                need = {(e, "down_proj") for e in range(n_exp)}
            else:
                need = {"all"}
            if need - have:
                missing.append(PREFIX + name)
        if missing:
            raise KeyError(f"missing MTP tensor(s): {', '.join(missing[:5])}")
        self.load_state_dict({k: v.to(own[k].dtype) for k, v in fused.items()})


def load_mtp(model: Qwen35ForCausalLM, hidden_source: str | None = None) -> MTPHead | None:
    """Compatibility shim: ``load_model`` now builds the head as ``model.mtp``; this returns it (None when the
    checkpoint has none).  A ``hidden_source`` other than the loaded one is refused: pass ``mtp_hidden_source``
    to ``load_model`` instead."""
    head = model.mtp
    if head is not None and hidden_source is not None and hidden_source != head.hidden_source:
        raise ValueError(f"model.mtp reads {head.hidden_source!r} hidden states; load the model with "
                         f"mtp_hidden_source={hidden_source!r} instead")
    return head


__all__ = ["MTPHead", "HIDDEN_SOURCES", "DEFAULT_HIDDEN_SOURCE", "mtp_text_config", "load_mtp"]
