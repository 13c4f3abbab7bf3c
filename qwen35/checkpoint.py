"""Checkpoint folders in, checkpoint folders out.

Reads official Qwen3.5 / Qwen3.6 folders unchanged: ``config.json`` plus one ``model.safetensors`` or shards
listed in ``model.safetensors.index.json``; names with the multimodal ``model.language_model.`` prefix or the
text-only ``model.`` prefix; MoE experts fused (``experts.gate_up_proj`` [E, 2I, H]) or per expert
(``experts.N.gate_proj.weight`` …); block-FP8 weights (``weight_scale_inv`` per 128×128 block), kept as FP8
by default or dequantised to a requested dtype, and the quantized folders qwen35 writes (qwen35/quant/saved.py).
The MTP block (``mtp.*``) loads like every other weight into ``model.mtp`` when the config has MTP layers and the folder holds their weights, and the vision tower (``model.visual.*``) into
``model.visual`` when the config has a ``vision_config`` and the folder its weights; ``mtp.*`` of a config without
MTP layers (and ``model.visual.*`` of one without a vision_config) is kept aside in ``model.extra_tensors`` and
written back by ``save_pretrained``.

Memory: the model is created without storage, each tensor is read from the memory-mapped file and copied
into its final place in the target dtype, so loading never holds two full copies of the weights.
"""

from __future__ import annotations

import functools
import json
import mmap
import os
import re
import shutil
import warnings
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from .config import ConfigError, ModelConfig, load_config

if TYPE_CHECKING:
    from .quant.saved import SavedFormat

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
VISION_PREFIX = "model.visual."
MTP_PREFIX = "mtp."
# main stack and MTP block alike: official Qwen3.5 checkpoints store the MTP experts per expert
_PER_EXPERT = re.compile(r"^((?:model|mtp)\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)"
                         r"\.weight$")
# Where training records which hidden state its MTP head reads (official checkpoints have no such file: their
# head reads post-norm states, the default).
TRAINING_INFO = "training_info.json"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16}
# Decay parameters stay float32 whatever the weight dtype: exp(A_log) in bf16 would move every decay rate.
KEEP_FP32 = ("linear_attn.A_log", "linear_attn.dt_bias")
PROGRESS_BYTES = 256 * 1024 ** 2


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names the file or tensor."""


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class SafetensorsFile:
    """A memory-mapped .safetensors file whose pages are given back after each tensor is copied out.

    The safetensors library keeps every page it touched resident until the file is closed, so a load would
    peak at (file + weights).  Here each tensor is a zero-copy view of the mapping, and ``release`` drops its
    pages once it has been copied into the model, so the peak stays near the weights alone.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: too short to be a safetensors file (truncated?)")
            n = int.from_bytes(head, "little")
            if n <= 0 or 8 + n > size:
                raise CheckpointError(f"{path}: header length {n} does not fit a {size}-byte file; the file is "
                                      "truncated or not safetensors")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from None
        header.pop("__metadata__", None)
        self.base = 8 + n
        self.entries: dict[str, tuple[str, list[int], int, int]] = {}
        for name, e in header.items():
            try:
                dtype, shape, (start, end) = e["dtype"], list(e["shape"]), e["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: malformed header entry for tensor {name}") from None
            if dtype not in _ST_DTYPES:
                raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {dtype}")
            if self.base + end > size:
                raise CheckpointError(f"{path}: tensor {name} ends at byte {self.base + end} but the file has "
                                      f"{size} bytes; the file is truncated")
            self.entries[name] = (dtype, shape, start, end)
        self._map = None
        if size:
            fd = os.open(path, os.O_RDONLY)
            try:  # a private mapping is writable for torch.frombuffer, and nothing is ever written to it
                self._map = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
            finally:
                os.close(fd)

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> list[int]:
        return self.entries[name][1]

    def nbytes(self, name: str) -> int:
        _, _, start, end = self.entries[name]
        return end - start

    def is_float8(self, name: str) -> bool:
        return self.entries[name][0].startswith("F8")

    def tensor(self, name: str) -> torch.Tensor:
        dtype, shape, start, end = self.entries[name]
        if end == start:
            return torch.empty(shape, dtype=_ST_DTYPES[dtype])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flat = torch.frombuffer(self._map, dtype=_ST_DTYPES[dtype], count=(end - start) // _ST_DTYPES[dtype].itemsize,
                                    offset=self.base + start)
        return flat.view(shape)

    def copy_into(self, name: str, dst: torch.Tensor, src: torch.Tensor, step_bytes: int = 32 * 1024 ** 2) -> None:
        """dst.copy_(src) in slabs of leading rows, giving each slab's file pages back once copied, so that a
        large tensor (the embedding) never sits in memory twice.  ``src`` is this file's view of ``name`` or a
        tensor derived from it (dequantised FP8), in which case it is copied whole."""
        _, _, start, end = self.entries[name]
        if src.dim() == 0 or src.data_ptr() != self.tensor(name).data_ptr():
            dst.copy_(src)
            self._release(start, end)
            return
        rows = src.shape[0]
        row_bytes = max(1, (end - start) // max(rows, 1))
        step = max(1, step_bytes // row_bytes)
        for r in range(0, rows, step):
            r1 = min(rows, r + step)
            dst[r:r1].copy_(src[r:r1])
            self._release(start + r * row_bytes, start + r1 * row_bytes)

    def release(self, name: str) -> None:
        """Give the pages of tensor ``name`` back once it has been copied out (see ``_release``)."""
        _, _, start, end = self.entries[name]
        self._release(start, end)

    def _release(self, start: int, end: int) -> None:
        """Give pages of the byte range back to the OS (they are re-read from disk if touched again)."""
        if self._map is None or not hasattr(self._map, "madvise"):
            return
        page = mmap.PAGESIZE
        lo = (self.base + start) // page * page
        hi = (self.base + end) // page * page  # a partial last page may still hold the next tensor's bytes
        if hi > lo:
            self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


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
        for name in SafetensorsFile(shard).keys():
            files[name] = shard
    return files


def canonical_name(name: str) -> str:
    """Official multimodal names -> the names our modules use (text under ``model.``, the tower ``visual.``)."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith(VISION_PREFIX):
        return "visual." + name[len(VISION_PREFIX):]
    return name


# ----------------------------------------------------------------------------------------------------------------
# FP8


# Quantizing a tensor while loading makes float32 temporaries a few times its size.  glibc keeps freed blocks of
# that size in its heap once its mmap threshold has risen (it does after the first large free), so without a trim
# the peak grew by ~the bf16 weights over a load with 2 threads (tests/test_load_memory.py: 510 MB vs 290 MB).
TRIM_BYTES = 4 << 20


@functools.cache
def _malloc_trim():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows): nothing to trim
        return None


def _return_freed_heap() -> None:
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


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


def saved_mtp_hidden_source(folder: str | os.PathLike) -> str:
    """The hidden source the folder's MTP head was trained with (``training_info.json``), else the default."""
    from .model.mtp import DEFAULT_HIDDEN_SOURCE, HIDDEN_SOURCES

    info = Path(folder) / TRAINING_INFO
    if not info.is_file():
        return DEFAULT_HIDDEN_SOURCE
    try:
        src = json.loads(info.read_text()).get("mtp_hidden_source")
    except (json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"{info}: not a JSON object ({e})") from None
    if src is None:
        return DEFAULT_HIDDEN_SOURCE
    if src not in HIDDEN_SOURCES:
        raise CheckpointError(f"{info}: mtp_hidden_source {src!r} is not one of {', '.join(HIDDEN_SOURCES)}")
    return src


def _expected_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    params = dict(model.named_parameters(remove_duplicate=True))
    if model.config.text.tie_word_embeddings:
        params.pop("lm_head.weight", None)
    return params


def load_model(path: str | os.PathLike, dtype: str | torch.dtype | None = "auto", device: str = "cpu",
               progress: bool | None = None, mtp_hidden_source: str | None = None,
               quantization: str | SavedFormat | None = "auto"):
    """Load a checkpoint folder. ``dtype``: "auto" (bf16 for bf16/FP8 checkpoints, else as stored),
    "bfloat16", "float32" or "float16".

    ``quantization`` (see qwen35/quant/saved.py): "auto" (default) keeps a quantized folder (official block-FP8,
    or one ``qwen35 quantize`` wrote) in its format — FP8 weights stay FP8, memory equals the checkpoint's —
    unless ``dtype`` is given explicitly, which widens it to that dtype as before; a float folder loads as float.
    None / "none" always widens.  A format name ("fp8", "int8", "int4") loads into that format: a folder already
    in it as stored, any other folder quantized tensor by tensor as it is read (the float model is never built);
    a format object (``qwen35.quant.saved.Int4Format(group_size=64, lm_head="int4")``) chooses its settings.

    ``model.mtp`` is the MTP block when the config has ``mtp_num_hidden_layers > 0`` and the folder holds
    ``mtp.*`` weights (all of them: a partial block is an error), else None; ``model.visual`` likewise is the
    vision tower when the config has a ``vision_config`` and the folder ``model.visual.*`` weights.  It reads ``mtp_hidden_source``
    hidden states; None: what ``training_info.json`` records, else "post_norm" (official checkpoints)."""
    from .model import Qwen35ForCausalLM
    from .model.mtp import DEFAULT_HIDDEN_SOURCE

    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder (expected a checkpoint folder with config.json)")
    config = load_config(folder)
    from .quant.saved import format_of_config, resolve_load, set_module

    quant = config.quantization
    stored_fmt = None  # the format that wrote the folder's quantized weights
    if quant is not None:
        try:
            stored_fmt = format_of_config(quant.raw)
        except ValueError as e:
            raise CheckpointError(f"{folder / 'config.json'}: {e}") from None
        if stored_fmt is None:
            raise CheckpointError(f"{folder / 'config.json'}: quantization_config.quant_method "
                                  f"{quant.quant_method!r} (fmt {quant.fmt!r}) is not supported; qwen35 reads "
                                  "block-FP8 (e4m3) checkpoints, the int8 and int4 ones qwen35 quantize writes "
                                  "(compressed-tensors int-quantized, qwen35-int4) and unquantised ones")
    try:
        target_fmt, keep_stored = resolve_load(stored_fmt, quantization, dtype not in (None, "auto"))
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    aux_endings = stored_fmt.endings if stored_fmt is not None else ("_scale_inv",)

    files = weight_files(folder)
    handles = {f: SafetensorsFile(f) for f in sorted(set(files.values()))}
    for name, f in files.items():
        if name not in handles[f].entries:
            raise CheckpointError(f"tensor {name} is listed in the index but missing from {f.name}")
    stored = {name: handles[f] for name, f in files.items()}

    # the quantized weights and their scales say nothing about the dtype of the rest
    on_disk = {h.entries[n][0] for n, h in stored.items() if not n.endswith(aux_endings)
               and not any(n + end in stored for end in aux_endings)}
    auto = torch.float32 if on_disk and on_disk <= {"F32", "F64"} else torch.bfloat16
    target = resolve_dtype(dtype, auto)

    # the MTP block exists only with its weights: a config that declares one over a folder without it gives a
    # model without one, never a randomly initialised head
    with_mtp = config.text.mtp_num_hidden_layers > 0 and any(n.startswith(MTP_PREFIX) for n in stored)
    # likewise the tower: a text-only use of a multimodal folder stripped of its tower keeps working
    with_vision = config.vision is not None and any(n.startswith(VISION_PREFIX) for n in stored)
    aside = tuple(prefix for prefix, built in ((VISION_PREFIX, with_vision), (MTP_PREFIX, with_mtp)) if not built)
    source = DEFAULT_HIDDEN_SOURCE
    if with_mtp:  # decided now, so that model.mtp is ready to use
        source = mtp_hidden_source if mtp_hidden_source is not None else saved_mtp_hidden_source(folder)

    # built without storage, converted while still storage-less, then given uninitialised memory that the
    # copies below fill exactly once
    with torch.device("meta"):
        model = Qwen35ForCausalLM(config, mtp=with_mtp, mtp_hidden_source=source, vision=with_vision)
    model.to(target)
    expected = _expected_params(model)
    for name, p in expected.items():
        p.requires_grad_(False)
        if name.endswith(KEEP_FP32):
            p.data = p.data.float()

    # plan: checkpoint name -> (param name, expert index or None, part)
    plan: dict[str, tuple[str, int | None, str]] = {}
    # stored weight name -> its quantization tensors ({"weight_scale_inv": name} ...)
    scales: dict[str, dict[str, str]] = {}
    extras: list[str] = []
    for name in stored:
        if name.startswith(aside):
            extras.append(name)
            continue
        ending = next((end for end in aux_endings if name.endswith(end)), None)
        if ending is not None:
            scales.setdefault(name[: -len(ending)], {})["weight" + ending] = name
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
    for base, group in scales.items():
        if base not in plan and canonical_name(base) not in plan and base not in stored:
            raise CheckpointError(f"scale tensor {next(iter(group.values()))} has no weight {base}")
    if scales and stored_fmt is None:
        raise CheckpointError(f"{folder}: holds FP8 scale tensors (e.g. {next(iter(next(iter(scales.values())).values()))}) "
                              "but config.json has no quantization_config")

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

    # which Linear layers / expert banks load into quantized modules (param name -> module name)
    converted = _converted_modules(model, plan, scales, target_fmt, keep_stored)

    # shapes, checked before any data is read
    I, H = cfg.moe_intermediate_size, cfg.hidden_size
    part_shape = {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
    for name, (pname, e, part) in plan.items():
        shape = tuple(stored[name].shape(name))
        want = tuple(expected[pname].shape) if e is None else part_shape[part]
        if name in scales and len(shape) == 2:  # a stored quantized weight: its format checks shapes and dtypes
            group = {"weight": stored[name].tensor(name), **{k: stored[n].tensor(n) for k, n in scales[name].items()}}
            try:
                stored_fmt.check(group, want, f"tensor {name} in {files[name].name}")
            except ValueError as err:
                raise CheckpointError(str(err)) from None
            continue
        if name in scales and pname in converted and keep_stored:
            raise CheckpointError(f"tensor {name}: quantized expert banks load from the per-expert layout "
                                  "(experts.E.{gate,up,down}_proj.weight), not a fused one")
        if shape != want:
            raise CheckpointError(f"tensor {name} in {files[name].name} has shape {list(shape)}, expected "
                                  f"{list(want)} from config.json")

    total = sum(stored[n].nbytes(n) for n in plan)
    show = progress if progress is not None else total >= PROGRESS_BYTES
    bar = None
    if show:
        from tqdm import tqdm
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {folder.name}", leave=False)
    banks: dict[str, torch.nn.Module] = {}
    # the tensors that load into quantized modules go first, largest first (the rest in file order): each one's
    # working set (its float pages, the quantized result and the module's copy: ~2.5x a bf16 lm_head when it is
    # int8) then passes while little else is resident instead of on top of the whole model
    order = sorted(plan, key=lambda n: (plan[n][0] not in converted, -stored[n].nbytes(n))) if converted else plan
    heap_trimmed = not converted
    with torch.no_grad():
        for name in order:
            pname, e, part = plan[name]
            if not heap_trimmed and pname not in converted:  # the conversions are done: give their heap back
                _return_freed_heap()
                heap_trimmed = True
            t = stored[name].tensor(name)
            group = {k: stored[n].tensor(n) for k, n in scales.get(name, {}).items()}
            if pname in converted:
                _load_converted(model, banks, converted[pname], pname, e, part, t, group, stored_fmt, target_fmt,
                                keep_stored, target)
                for n in (name, *scales.get(name, {}).values()):
                    stored[n].release(n)
                if stored[name].nbytes(name) >= TRIM_BYTES:
                    _return_freed_heap()
                if bar is not None:
                    bar.update(stored[name].nbytes(name))
                continue
            if group:
                t = _dequantize_stored(stored_fmt, name, t, group).to(target)
            elif not t.is_floating_point() or stored[name].is_float8(name):
                raise CheckpointError(f"tensor {name} is {t.dtype} but has no "
                                      f"{' / '.join(name + end for end in aux_endings)}")
            dst = expected[pname]
            if dst.is_meta:  # first tensor for this parameter: give it memory, filled exactly once below
                dst = _materialize(model, pname, dst, device)
                expected[pname] = dst
            if e is not None:
                dst = dst[e, :I] if part == "gate_proj" else dst[e, I:] if part == "up_proj" else dst[e]
            stored[name].copy_into(name, dst, t)
            if bar is not None:
                bar.update(stored[name].nbytes(name))
        model.extra_tensors = {n: stored[n].tensor(n).clone() for n in extras}
    if bar is not None:
        bar.close()
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if target_fmt is not None:
        if cfg.tie_word_embeddings and target_fmt.converts("lm_head"):  # as the in-memory recipe does
            with torch.no_grad():
                set_module(model, "lm_head",
                           target_fmt.linear(target_fmt.quantize(model.model.embed_tokens.weight, "lm_head")))
        model.quantization = target_fmt.name
    model.eval()
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:  # cannot happen when the coverage check above passed; guard against silent garbage
        raise CheckpointError(f"{folder}: no data was loaded for {', '.join(leftover[:5])}")
    model.source_path = folder  # save_pretrained copies the tokenizer files from here
    return model


def _dequantize_stored(fmt, name: str, t: torch.Tensor, group: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float32 value of a stored quantized weight (a fused FP8 expert bank [E, R, C] included)."""
    if t.dim() == 2:
        return fmt.dequantize({"weight": t, **group})
    if fmt.name == "fp8" and "weight_scale_inv" in group:
        return dequantize_block_fp8(t, group["weight_scale_inv"], fmt.block, torch.float32)
    raise CheckpointError(f"tensor {name}: a {t.dim()}-D {fmt.name} tensor; {fmt.name} weights are 2-D")


def _converted_modules(model, plan, scales, fmt, keep_stored: bool) -> dict[str, str]:
    """param name -> module name of the parameters that load into ``fmt``'s quantized modules: with
    ``keep_stored`` the Linear layers / expert banks whose stored weights are quantized (all of a bank's, or it is
    an error), else those the format's recipe converts.  Only bias-free Linear layers of the text model and the
    MTP block, and routed-expert banks, are converted (the vision tower stays in the model's dtype)."""
    from .model.moe import Experts

    if fmt is None:
        return {}
    by_param: dict[str, list[str]] = defaultdict(list)
    for name, (pname, _, _) in plan.items():
        by_param[pname].append(name)
    out: dict[str, str] = {}
    for pname, names in by_param.items():
        mname, _, attr = pname.rpartition(".")
        if mname.startswith("visual"):
            continue
        module = model.get_submodule(mname)
        if isinstance(module, torch.nn.Linear) and attr == "weight" and module.bias is None:
            pass
        elif isinstance(module, Experts) and attr in ("gate_up_proj", "down_proj"):
            pass
        else:
            continue
        if keep_stored:
            quantized = [n in scales for n in names]
            if any(quantized) and not all(quantized):
                plain = next(n for n, q in zip(names, quantized) if not q)
                raise CheckpointError(f"{mname}: some of its tensors are quantized and {plain} is not; a module is "
                                      "quantized whole or not at all")
            if not all(quantized):
                continue
        elif not fmt.converts(mname):
            continue
        out[pname] = mname
    return out


def _load_converted(model, banks: dict, mname: str, pname: str, e: int | None, part: str, t: torch.Tensor,
                    group: dict[str, torch.Tensor], stored_fmt, fmt, keep_stored: bool, dtype: torch.dtype) -> None:
    """Put one stored tensor into its quantized module: as stored (``keep_stored``: the format's own tensors,
    copied), or quantized from its float value in the model's dtype (what the in-memory recipe would see)."""
    from .quant.saved import set_module

    def float_value(x: torch.Tensor, g: dict[str, torch.Tensor]) -> torch.Tensor:
        return (_dequantize_stored(stored_fmt, pname, x, g) if g else x).to(dtype)

    def tensors_of(x: torch.Tensor, g: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"weight": x, **g} if keep_stored else fmt.quantize(float_value(x, g), mname)

    if pname.endswith(".weight") and not pname.endswith(("experts.gate_up_proj", "experts.down_proj")):
        set_module(model, mname, fmt.linear(tensors_of(t, group)))
        return
    bank = banks.get(mname)
    if bank is None:
        old = model.get_submodule(mname)
        H = old.down_proj.shape[1]
        bank = fmt.new_experts(old.n_experts, H, old.intermediate)
        set_module(model, mname, bank)
        banks[mname] = bank
    if part != "all":
        fmt.set_expert(bank, e, part, tensors_of(t, group))
        return
    # a fused float bank on disk: expert by expert, so only one expert's float copy exists at a time
    inter = bank.intermediate
    for ei in range(t.shape[0]):
        g = {k: v[ei] for k, v in group.items()}
        if pname.endswith("gate_up_proj"):
            w = float_value(t[ei], g) if g else t[ei].to(dtype)
            fmt.set_expert(bank, ei, "gate_proj", fmt.quantize(w[:inter], mname))
            fmt.set_expert(bank, ei, "up_proj", fmt.quantize(w[inter:], mname))
        else:
            fmt.set_expert(bank, ei, "down_proj", fmt.quantize(float_value(t[ei], g), mname))


def _materialize(model: torch.nn.Module, pname: str, meta: torch.Tensor, device: str) -> torch.Tensor:
    """Swap a storage-less parameter for an uninitialised real one (no pages touched until written)."""
    owner_name, _, attr = pname.rpartition(".")
    owner = model.get_submodule(owner_name)
    p = torch.nn.Parameter(torch.empty(meta.shape, dtype=meta.dtype, device=device), requires_grad=False)
    setattr(owner, attr, p)
    return p


# ----------------------------------------------------------------------------------------------------------------
# saving


# Files besides config and weights that make a folder loadable by a tokenizer and a chat front end.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                   "special_tokens_map.json", "generation_config.json", "vocab.json", "merges.txt")


def save_pretrained(model, folder: str | os.PathLike, max_shard_bytes: int = 4 * 1024 ** 3,
                    tokenizer_from: str | os.PathLike | None = None) -> None:
    """Write config.json and safetensors (sharded with an index past ``max_shard_bytes``) in official naming:
    ``model.language_model.`` for multimodal configs, ``model.`` for text-only ones; experts fused.  The vision
    tower goes under ``model.visual.*`` when the config has a vision_config (a config without one describes a
    model without a tower, so a tower left on such a model is not written).  The MTP
    block goes under the official top-level ``mtp.*`` names, experts per expert as official Qwen3.5 checkpoints
    store them (transformers ignores ``mtp.*``); a hidden source other than the default is recorded in
    ``training_info.json`` so that ``load_model`` builds the same head again.

    The tokenizer, chat template and generation_config are copied from ``tokenizer_from`` (default: the folder the
    model was loaded from, when it was), so the written folder loads in :class:`qwen35.LLM` and transformers."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    source = tokenizer_from if tokenizer_from is not None else getattr(model, "source_path", None)
    if source is not None and Path(source).resolve() != out.resolve():
        for name in TOKENIZER_FILES:
            if (Path(source) / name).is_file():
                shutil.copyfile(Path(source) / name, out / name)
    config: ModelConfig = model.config
    body = config.to_dict()
    body["dtype"] = str(model.dtype).removeprefix("torch.")
    if config.quantization is not None:  # weights are written dequantised
        body.pop("quantization_config", None)
    quantized = None
    if getattr(model, "quantization", None) is not None:  # written in its format (qwen35/quant/saved.py)
        from .quant.saved import quantized_checkpoint

        try:
            quantized, body["quantization_config"] = quantized_checkpoint(model)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    (out / "config.json").write_text(json.dumps(body, indent=2) + "\n")

    prefix = "model.language_model." if config.multimodal else "model."
    tensors: dict[str, torch.Tensor] = {}
    for name, p in _expected_params(model).items():
        if name.startswith(MTP_PREFIX):
            continue  # written below in the official layout
        if name.startswith("visual."):
            if config.vision is None:
                continue
            key = VISION_PREFIX + name[len("visual."):]
        else:
            key = prefix + name[len("model."):] if name.startswith("model.") else name
        tensors[key] = p.detach().contiguous()
    mtp = getattr(model, "mtp", None)
    if mtp is not None:
        tensors.update(mtp.official_state_dict(per_expert=True))
        _record_hidden_source(out, mtp.hidden_source)
    for name, t in model.extra_tensors.items():
        tensors[name] = t.contiguous()
    if quantized is not None:
        tensors = quantized

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


def _record_hidden_source(folder: Path, source: str) -> None:
    """Keep ``training_info.json``'s mtp_hidden_source equal to the head being written.  The file is created only
    for a source other than the default, which is what a folder without it means."""
    from .model.mtp import DEFAULT_HIDDEN_SOURCE

    info = folder / TRAINING_INFO
    body = None
    if info.is_file():
        try:
            body = json.loads(info.read_text())
        except json.JSONDecodeError:
            pass
    if not isinstance(body, dict):
        if source == DEFAULT_HIDDEN_SOURCE:
            return
        body = {}
    if body.get("mtp_hidden_source") != source:
        body["mtp_hidden_source"] = source
        info.write_text(json.dumps(body, indent=2) + "\n")


__all__ = ["load_model", "save_pretrained", "CheckpointError", "ConfigError", "dequantize_block_fp8",
           "resolve_dtype", "saved_mtp_hidden_source"]
