"""Training-from-scratch initialisation (qwen35.model.init_weights): every kind of weight gets its rule, for the
text model, its MTP block and the vision tower; the same seed gives the same weights."""

from __future__ import annotations

import torch
from torch import nn

from qwen35.config import config_from_dict
from qwen35.model import Qwen35ForCausalLM, init_weights
from qwen35.train.presets import build_model, model_preset


def test_init_weights() -> None:
    from qwen35.model.deltanet import GatedDeltaNet
    from qwen35.model.mtp import MTPHead
    from qwen35.model.norm import GatedRMSNorm, RMSNorm

    torch.manual_seed(0)
    model = build_model(model_preset("tiny"), 512)
    head = MTPHead(model.text_config)
    init_weights(model)
    init_weights(head)
    for m in list(model.modules()) + list(head.modules()):
        if isinstance(m, RMSNorm):
            assert not m.weight.any()
        elif isinstance(m, GatedRMSNorm):
            assert (m.weight == 1).all()
        elif isinstance(m, GatedDeltaNet):
            assert (m.dt_bias == 1).all()
            a = m.A_log.exp()
            assert (a >= 0.01).all() and (a <= 16).all()
    emb = model.model.embed_tokens.weight
    assert abs(emb.std().item() - 0.02) < 0.002
    assert abs(model.model.layers[0].mlp.gate.weight.std().item() - 0.02) < 0.005  # router no longer zero
    assert abs(head.fc.weight.std().item() - 0.02) < 0.003


def _vision_model():
    body = {"model_type": "qwen3_5_moe", "text_config": {**model_preset("tiny"), "model_type": "qwen3_5_moe_text"},
            "vision_config": {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                              "in_channels": 3, "patch_size": 16, "temporal_patch_size": 2,
                              "spatial_merge_size": 2, "num_position_embeddings": 16, "out_hidden_size": 64},
            "image_token_id": 500, "video_token_id": 501, "vision_start_token_id": 502, "vision_end_token_id": 503}
    body["text_config"]["vocab_size"] = 512
    return Qwen35ForCausalLM(config_from_dict(body, source="test"), vision=True)


def test_init_weights_covers_the_vision_tower() -> None:
    torch.manual_seed(1)
    model = _vision_model()
    tower = model.visual
    with torch.no_grad():
        for p in tower.parameters():
            p.fill_(7.0)  # so that every value checked below was written by init_weights
    init_weights(tower, 0.02)
    kinds = set()
    for m in tower.modules():
        if isinstance(m, (nn.Linear, nn.Conv3d, nn.Embedding)):
            kinds.add(type(m).__name__)
            assert abs(m.weight.std().item() - 0.02) < 0.01, m
            if getattr(m, "bias", None) is not None:
                assert not m.bias.any()
        elif isinstance(m, nn.LayerNorm):
            kinds.add("LayerNorm")
            assert (m.weight == 1).all() and not m.bias.any()
    assert kinds == {"Linear", "Conv3d", "Embedding", "LayerNorm"}
    assert not any((p == 7.0).any() for p in tower.parameters())


def test_same_seed_same_weights() -> None:
    states = []
    for _ in range(2):
        torch.manual_seed(5)
        model = _vision_model()
        init_weights(model)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
