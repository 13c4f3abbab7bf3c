"""Feed-forward blocks: the dense SwiGLU MLP and the sparse mixture of experts.

MoE: router logits x Wᵀ, softmax over *all* experts in fp32, top-k, renormalised over the k; each chosen
expert is a SwiGLU; a shared SwiGLU expert is added, scaled by sigmoid(shared_expert_gate x).  Experts are
stored fused as in official checkpoints: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I].
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from qwen35.kernels.ops import linear, moe_experts, swiglu

from ..config import TextConfig
from .linear import Linear, project


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=False)
        self.up_proj = Linear(hidden, intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, [self.gate_proj, self.up_proj])
        return self.down_proj(swiglu(gate, up))


class Routing(NamedTuple):
    logits: torch.Tensor  # [N, E] router logits (activation dtype), kept for the balance loss
    weights: torch.Tensor  # [N, k] renormalised top-k probabilities, activation dtype
    experts: torch.Tensor  # [N, k] expert ids


class Router(nn.Module):
    def __init__(self, hidden: int, n_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.weight = nn.Parameter(torch.zeros(n_experts, hidden))

    def forward(self, x: torch.Tensor, experts: torch.Tensor | None = None) -> Routing:
        """x [N, H] -> the routing of each token.  ``experts`` [N, k] (routing replay, as RL trainers do with
        the experts an inference engine chose): take these ids instead of the top-k; their weights are this
        router's own probabilities of them, renormalised, so the router still gets its gradient."""
        logits = linear(x, self.weight)
        probs = torch.softmax(logits.float(), dim=-1)
        if experts is None:
            top, idx = probs.topk(self.top_k, dim=-1)
        else:
            if experts.shape != (*probs.shape[:-1], self.top_k):
                raise ValueError(f"replayed experts have shape {tuple(experts.shape)}, expected "
                                 f"{(*probs.shape[:-1], self.top_k)} (tokens, top_k)")
            idx = experts.to(device=probs.device, dtype=torch.long)
            top = probs.gather(-1, idx)
        top = top / top.sum(-1, keepdim=True)
        return Routing(logits, top.to(logits.dtype), idx)


class Experts(nn.Module):
    def __init__(self, n_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.n_experts, self.intermediate = n_experts, intermediate
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden, intermediate))
        nn.init.normal_(self.gate_up_proj, std=0.02)
        nn.init.normal_(self.down_proj, std=0.02)

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        return moe_experts(x, routing.experts, routing.weights, self.gate_up_proj, self.down_proj)


class SparseMoE(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.gate = Router(h, cfg.num_experts, cfg.num_experts_per_tok)
        self.experts = Experts(cfg.num_experts, h, cfg.moe_intermediate_size)
        self.shared_expert = MLP(h, cfg.shared_expert_intermediate_size)
        self.shared_expert_gate = Linear(h, 1, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the output and the router logits [N, E] (for the load-balancing loss)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        routing = self.gate(x)
        y = self.experts(x, routing) + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y.reshape(shape), routing.logits
