from __future__ import annotations

import pytest
import torch

from qwen35.config import config_from_dict
from qwen35.model import Qwen35ForCausalLM

BASE = dict(vocab_size=96, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
            linear_value_head_dim=8, max_position_embeddings=4096, eos_token_id=95,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.25))


def tiny_model(moe: bool = False, seed: int = 0, **overrides) -> Qwen35ForCausalLM:
    """A random float32 model whose logits have clear gaps, so greedy choices are stable under rounding;
    ``overrides`` change config fields (e.g. a real tokenizer's vocab_size and eos_token_id)."""
    d = dict(BASE, model_type="qwen3_5_moe_text" if moe else "qwen3_5_text", **overrides)
    if moe:
        d.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)
    else:
        d.update(intermediate_size=96)
    torch.manual_seed(seed)
    m = Qwen35ForCausalLM(config_from_dict(d))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
            elif p.dim() >= 2:
                p.normal_(0, 0.08)
        m.lm_head.weight.mul_(6)
    return m.eval()


@pytest.fixture(scope="session", params=[False, True], ids=["dense", "moe"])
def model(request):
    return tiny_model(request.param)


@pytest.fixture(params=["native", "torch"])
def kernels_switch(request, monkeypatch):
    """Run a test with the native kernels (the default where they build) and with PyTorch alone."""
    import qwen35.kernels as kernels

    monkeypatch.setenv(kernels.ENV_SWITCH, "1" if request.param == "native" else "0")
    kernels.reset()
    yield request.param
    kernels.reset()
