"""The multi-token-prediction (MTP) head: one extra decoder block that drafts the token after next.

    e = pre_fc_norm_embedding(embed(token_{t+1}))        shared embedding of the main model
    h = pre_fc_norm_hidden(hidden_t)                      hidden state of the main model at position t
    x = fc([e | h])                                       Linear(2H -> H), embedding half first
    x = layers.k(x)                                       a full-attention decoder block (own KV cache)
    logits_{t+2} = lm_head(norm(x))                       shared lm_head

Weight names are the official ones under the top-level ``mtp.`` prefix (``mtp.fc.weight``,
``mtp.layers.0.self_attn.q_proj.weight`` ...), so :meth:`MTPHead.official_state_dict` writes exactly what official
checkpoints hold and :meth:`MTPHead.load_official` reads them back (experts fused or per expert).

Position t of the MTP sequence uses RoPE position t, the position of the hidden state it reads (as vLLM does).
The head holds no request state: give it its own :class:`SequenceCache` (never the main model's) to draft
incrementally.  With several MTP layers, draft step ``k`` uses layer ``k % n`` (vLLM's recursion rule).

``hidden_source`` says which hidden state of the main model the head reads:

* ``"post_norm"`` — after the main model's final norm (what vLLM / SGLang feed the official MTP block);
* ``"pre_norm"`` — the last decoder layer output before it (``CausalLMOutput.hidden_states``).

Callers always pass the pre-norm tensor the model returns plus the model's final norm; the head applies the norm
itself when it reads post-norm states.  The hidden state it returns for recursive drafting is in the same form as
the one it reads (post ``mtp.norm`` for "post_norm", before it for "pre_norm").
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..config import TextConfig
from .context import SequenceCache, dense_context
from .norm import RMSNorm
from .rope import RotaryEmbedding
from .transformer import DecoderLayer

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
    """One official-layout MTP block (``mtp.*``); embedding and lm_head are the main model's, passed in."""

    def __init__(self, cfg: TextConfig, hidden_source: str = DEFAULT_HIDDEN_SOURCE) -> None:
        super().__init__()
        if hidden_source not in HIDDEN_SOURCES:
            raise ValueError(f"hidden_source must be one of {HIDDEN_SOURCES}, got {hidden_source!r}")
        self.hidden_source = hidden_source
        self.config = mtp_text_config(cfg)
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.fc = nn.Linear(2 * h, h, bias=False)
        self.pre_fc_norm_embedding = RMSNorm(h, eps)
        self.pre_fc_norm_hidden = RMSNorm(h, eps)
        self.layers = nn.ModuleList(DecoderLayer(self.config, i) for i in range(self.config.num_hidden_layers))
        self.norm = RMSNorm(h, eps)

    @classmethod
    def for_model(cls, model: Qwen35ForCausalLM, hidden_source: str = DEFAULT_HIDDEN_SOURCE) -> MTPHead:
        """A freshly initialised head matching ``model`` (same dtype and device); load weights separately."""
        head = cls(model.text_config, hidden_source)
        return head.to(device=model.device, dtype=model.dtype)

    # ------------------------------------------------------------------------------------------------------
    # running

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
        if hidden.dim() != 3 or next_ids.shape != hidden.shape[:2]:
            raise ValueError(f"hidden must be [B, T, H] and next_ids [B, T]; got {tuple(hidden.shape)} and "
                             f"{tuple(next_ids.shape)}")
        if self.hidden_source == "post_norm" and final_norm is not None:
            hidden = final_norm(hidden)
        e = self.pre_fc_norm_embedding(embed(next_ids))
        x = self.fc(torch.cat([e, self.pre_fc_norm_hidden(hidden)], dim=-1))
        ctx, finish = dense_context(rope, x, cache, position_ids, attention_mask)
        layer = self.layers[step % len(self.layers)]
        x, router_logits = layer(x, ctx)
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
        return self(hidden, next_ids, model.model.embed_tokens, model.lm_head, model.model.rotary, cache=cache,
                    attention_mask=attention_mask, final_norm=model.model.norm if from_model else None, step=step)

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


def load_mtp(model: Qwen35ForCausalLM, hidden_source: str = DEFAULT_HIDDEN_SOURCE) -> MTPHead | None:
    """The MTP head stored in a loaded model's ``extra_tensors`` (None when the checkpoint has none)."""
    if not any(k.startswith(PREFIX) for k in model.extra_tensors):
        return None
    head = MTPHead.for_model(model, hidden_source)
    head.load_official(model.extra_tensors)
    head.requires_grad_(False)
    return head.eval()


__all__ = ["MTPHead", "HIDDEN_SOURCES", "DEFAULT_HIDDEN_SOURCE", "mtp_text_config", "load_mtp"]
