"""The model used when no ``--model`` is given.

The embedded default (a tiny Qwen3.5-MoE trained by ``qwen35.train.embedded``) ships in
``qwen35/assets/default`` once trained.  Until then the demo checkpoint stands in: the same architecture
(DeltaNet + attention 3:1, routed + shared experts) with *random* weights and a small BPE tokenizer that holds
every Qwen3.5 special token, built once into the user's cache folder.  It exercises every code path; its
text is noise.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

DEMO_VERSION = "demo-random-v1"


def cache_dir() -> Path:
    base = os.environ.get("QWEN35_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"),
                                                          "qwen35")
    return Path(base)


def embedded_model_path() -> Path | None:
    p = Path(__file__).parent / "assets" / "default"
    return p if (p / "config.json").exists() and (p / "tokenizer.json").exists() else None


def demo_config(vocab_size: int) -> dict:
    return dict(
        model_type="qwen3_5_moe_text", vocab_size=vocab_size, hidden_size=96, num_hidden_layers=4,
        layer_types=["linear_attention"] * 3 + ["full_attention"], num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=24,
        linear_value_head_dim=24, linear_conv_kernel_dim=4, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=64, shared_expert_intermediate_size=64, max_position_embeddings=8192,
        tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=1e6, partial_rotary_factor=0.25,
                                                       mrope_section=[11, 11, 10], mrope_interleaved=True),
        mtp_num_hidden_layers=0, eos_token_id=None)


def ensure_demo_checkpoint(folder: Path | None = None) -> Path:
    """Build (once) and return the random-weight demo checkpoint folder."""
    folder = folder or cache_dir() / DEMO_VERSION
    if (folder / "config.json").exists() and (folder / "tokenizer.json").exists():
        return folder
    import torch

    from .chat.template import default_template_source
    from .config import config_from_dict
    from .model import Qwen35ForCausalLM
    from .train.bpe import save_tokenizer, train_tokenizer
    from .train.data import generate_examples, render_example

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=folder.parent))
    try:
        texts = [render_example(ex) for ex in generate_examples(1500, seed=0)]
        tok = train_tokenizer(texts, vocab_size=1024)
        save_tokenizer(tok, tmp, chat_template=default_template_source())
        generator = torch.Generator().manual_seed(0)
        model = Qwen35ForCausalLM(config_from_dict(demo_config(tok.get_vocab_size()), "demo config"))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() >= 2:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
        model.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
