"""A tiny random-weight multimodal checkpoint with the embedded tokenizer, and pictures to send it: shared by the
server's and the CLI's picture tests (the same recipe as tests/test_llm_vision.py's ``folder``)."""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

import torch
from PIL import Image

import qwen35
import qwen35.chat
from tests.hf_oracle import build_hf, save_hf

ASSETS = Path(qwen35.__file__).parent / "assets" / "default"


def build_vision_checkpoint(folder: Path) -> Path:
    """transformers' Qwen3.5 with a one-block vision tower, random weights, the embedded tokenizer's vocabulary and
    vision token ids, saved to ``folder`` with that tokenizer and chat template."""
    tok = qwen35.chat.Tokenizer(ASSETS)
    ref = build_hf(False, multimodal=True, vocab_size=len(tok))
    for key, token in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                       ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")):
        setattr(ref.config, key, tok.token_to_id(token))
    path = save_hf(ref, folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(ASSETS / name, path / name)
    return path


def build_text_checkpoint(folder: Path) -> Path:
    """transformers' text-only Qwen3.5 (no vision tower), random weights, with the embedded tokenizer: the model
    that must refuse pictures."""
    tok = qwen35.chat.Tokenizer(ASSETS)
    path = save_hf(build_hf(False, multimodal=False, vocab_size=len(tok)), folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(ASSETS / name, path / name)
    return path


def picture(seed: int = 0, size: tuple[int, int] = (70, 50)) -> Image.Image:
    """Random RGB pixels, ``size`` = (width, height)."""
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy())


def encoded(img: Image.Image, fmt: str = "PNG", **save_args) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save_args)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()
