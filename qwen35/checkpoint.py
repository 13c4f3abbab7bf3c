"""Checkpoint folders in, checkpoint folders out.

Reads official Qwen3.5 / Qwen3.6 folders unchanged: ``config.json`` plus one ``model.safetensors`` or shards
listed in ``model.safetensors.index.json``; names with the multimodal ``model.language_model.`` prefix or the
text-only ``model.`` prefix; MoE experts fused (``experts.gate_up_proj`` [E, 2I, H]) or per expert
(``experts.N.gate_proj.weight`` …); block-FP8 weights (``weight_scale_inv`` per 128×128 block), dequantised to
the requested dtype.  ``model.visual.*`` and ``mtp.*`` are kept aside and written back by ``save_pretrained``.

Memory: the model is created without storage, each tensor is read from the memory-mapped file and copied
into its final place in the target dtype, so loading never holds two full copies of the weights.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ConfigError, ModelConfig, load_config

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
EXTRA_PREFIXES = ("model.visual.", "mtp.")
_PER_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16}
# Decay parameters stay float32 whatever the weight dtype: exp(A_log) in bf16 would move every decay rate.
KEEP_FP32 = ("linear_attn.A_log", "linear_attn.dt_bias")
PROGRESS_BYTES = 256 * 1024 ** 2


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names the file or tensor."""


def resolve_dtype(dtype: str | torch.dtype | None, default: torch.dtype = torch.bfloat16) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return default
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


# ----------------------------------------------------------------------------------------------------------------
# finding the tensors


def weight_files(folder: Path) -> dict[str, Path]:
    """tensor name -> file holding it, from the index or by opening every shard."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = {name: folder / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.exists():
                raise CheckpointError(f"{index} lists shard {shard.name}, which is not in {folder}")
        return files
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(f"{folder} holds only pickle weights ({', '.join(pickles)}); qwen35 never loads "
                                  "pickles (they can run code). Convert them to safetensors first.")
        raise CheckpointError(f"{folder}: no model.safetensors, no model.safetensors.index.json")
    files: dict[str, Path] = {}
    for shard in shards:
        for name in _open(shard).keys():
            files[name] = shard
    return files


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot be read as safetensors ({e}); the file may be truncated or "
                              "corrupt") from None


def canonical_name(name: str) -> str:
    """Official multimodal names -> the text-only names our modules use."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    return name


# ----------------------------------------------------------------------------------------------------------------
# FP8


def dequantize_block_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                         dtype: torch.dtype) -> torch.Tensor:
    """weight [..., R, C] float8 with one scale per block×block tile of the last two dims."""
    br, bc = block
    rows, cols = weight.shape[-2:]
    expected = (*weight.shape[:-2], -(-rows // br), -(-cols // bc))
    if tuple(scale_inv.shape) != expected:
        raise CheckpointError(f"scale_inv has shape {tuple(scale_inv.shape)}, expected {expected} for a "
                              f"{tuple(weight.shape)} weight in {br}x{bc} blocks")
    s = scale_inv.float().repeat_interleave(br, -2)[..., :rows, :].repeat_interleave(bc, -1)[..., :cols]
    return (weight.float() * s).to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# loading


def _expected_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    params = dict(model.named_parameters(remove_duplicate=True))
    if model.config.text.tie_word_embeddings:
        params.pop("lm_head.weight", None)
    return params


def load_model(path: str | os.PathLike, dtype: str | torch.dtype | None = "auto", device: str = "cpu",
               progress: bool | None = None):
    """Load a checkpoint folder. ``dtype``: "auto" (bf16 for bf16/FP8 checkpoints, else as stored),
    "bfloat16", "float32" or "float16"."""
    from .model import Qwen35ForCausalLM

    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder (expected a checkpoint folder with config.json)")
    config = load_config(folder)
    quant = config.quantization
    block = None
    if quant is not None:
        if quant.quant_method != "fp8" or (quant.fmt not in (None, "e4m3")):
            raise CheckpointError(f"{folder / 'config.json'}: quantization_config.quant_method "
                                  f"{quant.quant_method!r} (fmt {quant.fmt!r}) is not supported; qwen35 reads "
                                  "block-FP8 (e4m3) checkpoints and unquantised ones")
        if quant.weight_block_size is None or len(quant.weight_block_size) != 2:
            raise CheckpointError(f"{folder / 'config.json'}: quantization_config.weight_block_size must be "
                                  "[rows, cols] for FP8 checkpoints")
        block = tuple(quant.weight_block_size)

    files = weight_files(folder)
    handles = {f: _open(f) for f in sorted(set(files.values()))}
    stored = {name: handles[f].get_slice(name) for name, f in files.items() if name in set(handles[f].keys())}
    for name, f in files.items():
        if name not in stored:
            raise CheckpointError(f"tensor {name} is listed in the index but missing from {f.name}")

    on_disk = {s.get_dtype() for s in stored.values()}
    auto = torch.float32 if on_disk <= {"F32", "F64"} else torch.bfloat16
    target = resolve_dtype(dtype, auto)

    # built without storage, converted while still storage-less, then given uninitialised memory that the
    # copies below fill exactly once
    with torch.device("meta"):
        model = Qwen35ForCausalLM(config)
    model.to(target)
    expected = _expected_params(model)
    for name, p in expected.items():
        p.requires_grad_(False)
        if name.endswith(KEEP_FP32):
            p.data = p.data.float()
    model.to_empty(device=device)
    expected = _expected_params(model)  # to_empty made new parameter objects

    # plan: checkpoint name -> (param name, expert index or None, part)
    plan: dict[str, tuple[str, int | None, str]] = {}
    scales: dict[str, str] = {}
    extras: list[str] = []
    for name in stored:
        if name.endswith("_scale_inv"):
            scales[name[: -len("_scale_inv")]] = name
            continue
        if name.startswith(EXTRA_PREFIXES):
            extras.append(name)
            continue
        c = canonical_name(name)
        if config.text.tie_word_embeddings and c == "lm_head.weight":
            continue  # tied: some checkpoints store the shared matrix twice
        m = _PER_EXPERT.match(c)
        if m:
            prefix, e, part = m.group(1), int(m.group(2)), m.group(3)
            target_name = f"{prefix}.{'down_proj' if part == 'down_proj' else 'gate_up_proj'}"
            if target_name not in expected:
                raise CheckpointError(f"unexpected tensor {name} in {files[name].name}: this model has no "
                                      f"{target_name}")
            plan[name] = (target_name, e, part)
        elif c in expected:
            plan[name] = (c, None, "all")
        else:
            raise CheckpointError(f"unexpected tensor {name} in {files[name].name}: no such weight in a "
                                  f"{config.model_type} model with this config")
    for base, sname in scales.items():
        if base not in plan and canonical_name(base) not in plan and base not in stored:
            raise CheckpointError(f"scale tensor {sname} has no weight {base}")
    if scales and block is None:
        raise CheckpointError(f"{folder}: holds FP8 scale tensors (e.g. {next(iter(scales.values()))}) but "
                              "config.json has no quantization_config")

    # every parameter (and every expert slot) must be covered exactly once
    covered: dict[str, set] = defaultdict(set)
    for name, (pname, e, part) in plan.items():
        key = (e, part) if e is not None else "all"
        if key in covered[pname]:
            raise CheckpointError(f"tensor {name} duplicates another tensor for {pname}")
        covered[pname].add(key)
    cfg = config.text
    missing = []
    for pname in expected:
        have = covered.get(pname, set())
        if "all" in have:
            continue
        if pname.endswith("experts.gate_up_proj"):
            need = {(e, p) for e in range(cfg.num_experts) for p in ("gate_proj", "up_proj")}
        elif pname.endswith("experts.down_proj"):
            need = {(e, "down_proj") for e in range(cfg.num_experts)}
        else:
            need = {"all"}
        lacking = need - have
        if lacking:
            if have:
                e, p = sorted(lacking)[0]
                missing.append(f"{pname.rsplit('.', 1)[0]}.{e}.{p}.weight")
            else:
                missing.append(pname)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{folder}: missing tensor(s) {', '.join(missing[:5])}{more}")

    # shapes, checked before any data is read
    I, H = cfg.moe_intermediate_size, cfg.hidden_size
    part_shape = {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
    for name, (pname, e, part) in plan.items():
        shape = tuple(stored[name].get_shape())
        want = tuple(expected[pname].shape) if e is None else part_shape[part]
        if shape != want:
            raise CheckpointError(f"tensor {name} in {files[name].name} has shape {list(shape)}, expected "
                                  f"{list(want)} from config.json")

    total = sum(_nbytes(stored[n]) for n in plan)
    show = progress if progress is not None else total >= PROGRESS_BYTES
    bar = None
    if show:
        from tqdm import tqdm
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {folder.name}", leave=False)
    with torch.no_grad():
        for name, (pname, e, part) in plan.items():
            t = _read(handles[files[name]], name, files[name])
            if name in scales or _scale_name(name) in stored:
                sname = _scale_name(name)
                t = dequantize_block_fp8(t, _read(handles[files[sname]], sname, files[sname]), block, target)
            dst = expected[pname]
            if e is None:
                dst.copy_(t)
            elif part == "gate_proj":
                dst[e, :I].copy_(t)
            elif part == "up_proj":
                dst[e, I:].copy_(t)
            else:
                dst[e].copy_(t)
            if bar is not None:
                bar.update(_nbytes(stored[name]))
        model.extra_tensors = {n: _read(handles[files[n]], n, files[n]) for n in extras}
    if bar is not None:
        bar.close()
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.eval()
    return model


def _scale_name(name: str) -> str:
    return name + "_scale_inv"


def _nbytes(sl) -> int:
    n = 1
    for s in sl.get_shape():
        n *= s
    size = {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "F16": 2, "BF16": 2}.get(sl.get_dtype(), 1)
    return n * size


def _read(handle, name: str, file: Path) -> torch.Tensor:
    try:
        return handle.get_tensor(name)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"tensor {name} in {file}: cannot be read ({e}); the file may be truncated") from None


# ----------------------------------------------------------------------------------------------------------------
# saving


def save_pretrained(model, folder: str | os.PathLike, max_shard_bytes: int = 4 * 1024 ** 3) -> None:
    """Write config.json and safetensors (sharded with an index past ``max_shard_bytes``) in official naming:
    ``model.language_model.`` for multimodal configs, ``model.`` for text-only ones; experts fused."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    config: ModelConfig = model.config
    body = config.to_dict()
    body["dtype"] = str(model.dtype).removeprefix("torch.")
    if config.quantization is not None:  # weights are written dequantised
        body.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(body, indent=2) + "\n")

    prefix = "model.language_model." if config.multimodal else "model."
    tensors: dict[str, torch.Tensor] = {}
    for name, p in _expected_params(model).items():
        key = prefix + name[len("model."):] if name.startswith("model.") else name
        tensors[key] = p.detach().contiguous()
    for name, t in model.extra_tensors.items():
        tensors[name] = t.contiguous()

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        nb = t.numel() * t.element_size()
        if shards[-1] and size + nb > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nb
    for stale in list(out.glob("model*.safetensors")) + [out / "model.safetensors.index.json"]:
        if stale.exists():
            stale.unlink()
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata=meta)
        return
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata=meta)
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


__all__ = ["load_model", "save_pretrained", "CheckpointError", "ConfigError", "dequantize_block_fp8",
           "resolve_dtype"]
