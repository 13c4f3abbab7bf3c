"""GGUF in and out: llama.cpp's model files of the ``qwen35`` (dense) and ``qwen35moe`` architectures.

    model = load_gguf("Qwen3.5-0.8B-Q8_0.gguf")                 # -> Qwen35ForCausalLM, dequantised to bf16
    save_gguf(model, "ckpt-folder", "out.gguf", file_type="q8_0")   # a file llama.cpp loads

**Layout.**  A GGUF is what llama.cpp's ``convert_hf_to_gguf.py`` makes of an official checkpoint, and it is
not a renaming only.  The converter (``conversion/qwen.py``: ``Qwen3NextModel``, ``_LinearAttentionVReorderBase``,
``Qwen3_5TextModel`` / ``Qwen3_5MoeTextModel``) stores:

* every zero-centred RMSNorm weight (input / post-attention / final / q / k norms, the MTP norms) as ``1 + w``;
  the DeltaNet gated norm (``linear_attn.norm``) as it is;
* ``A_log`` as ``A = -exp(A_log)`` (``ssm_a``), ``dt_bias`` as ``ssm_dt.bias``, ``conv1d.weight`` [C, 1, K] squeezed
  to [C, K];
* with fewer key heads than value heads, the value heads of the DeltaNet layer in *tiled* order (value head
  ``r`` of key group ``g`` moves from ``g * R + r`` to ``r * G + g``): the V rows of ``in_proj_qkv``, the rows of
  ``in_proj_z`` / ``in_proj_a`` / ``in_proj_b``, ``A_log``, ``dt_bias``, the V channels of ``conv1d`` and the input
  columns of ``out_proj``, so that ggml's broadcast replaces an interleaved repeat;
* the fused experts ``gate_up_proj`` [E, 2I, H] as two tensors ``ffn_gate_exps`` / ``ffn_up_exps`` [E, I, H];
* the MTP block as layer ``L`` (``blk.L.*``, a full-attention layer) with ``mtp.fc`` / ``pre_fc_norm_*`` /
  ``mtp.norm`` as ``blk.L.nextn.{eh_proj, enorm, hnorm, shared_head_norm}``.

:func:`load_gguf` applies the inverse of each step, :func:`save_gguf` the step itself, so a file round-trips and
a converter-made file gives the checkpoint it came from.  Two inverses are not plain arithmetic: ``w = (1 + w) - 1``
is exact whenever ``1 + w`` was (and otherwise gives a ``w`` whose ``1 + w`` is the stored value, which is what the
norm computes); ``A_log`` is the float32 whose ``exp`` -- evaluated as the model's forward evaluates it -- equals the
stored ``-A`` exactly, found next to ``log(-A)`` (the one the checkpoint held is such a value).  So a BF16 file
gives the checkpoint's logits bit for bit.

**Tensor maths are ours.**  Dequantisation (F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q6_K) and quantisation (F32, F16,
BF16, Q8_0, Q4_0) are vectorised torch code written from ggml's block layouts, bit-exact against ggml's reference
(``ggml-quants.c``; the ``gguf`` package's numpy port is the test oracle).  The container is read by
:class:`GGUFFile`, a small parser of ours: ``gguf.GGUFReader`` builds one numpy array per vocabulary string and
takes ~50 s and 1.2 GB to open a Qwen3.5 file (248k tokens, 500k merges).  Writing uses ``gguf.GGUFWriter``
(``pip install gguf``), tensor by tensor; loading does not need the package.

**Memory.**  The model is built without storage; each tensor is read from the memory-mapped file in slabs of
rows, dequantised and copied into its parameter, and the file pages are given back -- the peak is the weights plus
one slab.  Saving holds one tensor in its file format at a time.

**Export types** (``file_type``): ``bf16``; ``q8_0`` (what the converter writes for ``--outtype q8_0``); ``q4_0``
(Q4_0 for the large matrices; token embedding, output head, ``in_proj_a`` / ``in_proj_b`` and ``mtp.fc`` in Q8_0 --
the high-precision exceptions of issue 18, where llama-quantize would use Q6_K for the head).  As in the converter,
1-D tensors, norms, routers, ``ssm_conv1d``, ``ssm_a`` and ``ssm_dt`` stay F32, and a matrix whose rows are not a
whole number of 32-blocks falls back to F16.  The vision tower is not written (llama.cpp keeps it in a separate
mmproj file).
"""

from __future__ import annotations

import mmap
import os
import re
import struct
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import numpy as np
import torch

from ..checkpoint import KEEP_FP32, PROGRESS_BYTES, _expected_params, _materialize, resolve_dtype
from ..config import ModelConfig, TextConfig, config_from_dict

if TYPE_CHECKING:  # pragma: no cover
    from ..model import Qwen35ForCausalLM

__all__ = [
    "DEQUANTIZABLE_TYPES",
    "FILE_TYPES",
    "GGUF_ARCHITECTURES",
    "QUANTIZABLE_TYPES",
    "GGUFError",
    "GGUFFile",
    "GGUFTensorInfo",
    "Placement",
    "config_from_gguf",
    "dequantize",
    "gguf_tensor_names",
    "load_gguf",
    "placements",
    "quantize",
    "read_gguf_metadata",
    "save_gguf",
    "tensor_type_for",
    "tokenizer_metadata",
    "type_name",
]

# GGUF architecture name -> whether it is the MoE variant
GGUF_ARCHITECTURES = {"qwen35": False, "qwen35moe": True}


class GGUFError(ValueError):
    """A GGUF file qwen35 cannot read or a model it cannot write; the message names the file, key or tensor."""


# ----------------------------------------------------------------------------------------------------------------
# ggml tensor types: ids, block geometry, names

F32, F16, Q4_0, Q8_0, Q4_K, Q6_K, BF16 = 0, 1, 2, 8, 12, 14, 30
# type id -> (values per block, bytes per block)
BLOCKS = {F32: (1, 4), F16: (1, 2), BF16: (1, 2), Q8_0: (32, 34), Q4_0: (32, 18), Q4_K: (256, 144),
          Q6_K: (256, 210)}
DEQUANTIZABLE_TYPES = (F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q6_K)
QUANTIZABLE_TYPES = (F32, F16, BF16, Q8_0, Q4_0)
_OWN_NAMES = {F32: "F32", F16: "F16", BF16: "BF16", Q8_0: "Q8_0", Q4_0: "Q4_0", Q4_K: "Q4_K", Q6_K: "Q6_K"}


def type_name(ggml_type: int) -> str:
    """'Q4_K', 'IQ2_XS', ...: the ggml name of a tensor type id (from the gguf package when it knows it)."""
    if ggml_type in _OWN_NAMES:
        return _OWN_NAMES[ggml_type]
    try:
        import gguf

        return gguf.GGMLQuantizationType(ggml_type).name
    except (ImportError, ValueError):
        return f"type {ggml_type}"


def _supported_list() -> str:
    return ", ".join(_OWN_NAMES[t] for t in DEQUANTIZABLE_TYPES)


# ----------------------------------------------------------------------------------------------------------------
# dequantisation: uint8 rows [..., row_bytes] -> values [..., row_len]
#
# Each follows ggml's reference dequantize_row_* (ggml-quants.c) operation for operation in float32, so the results
# are bit-identical to llama.cpp's and to the gguf package's numpy port.


def _f16(b: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 2] little-endian half -> float32 [..., 1]."""
    return b.contiguous().view(torch.float16).float()


def _dequantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    # block: f16 d, int8 q[32];  x = q * d
    d = _f16(blocks[:, :2])
    q = blocks[:, 2:].contiguous().view(torch.int8).float()
    return q * d


def _dequantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    # block: f16 d, uint8 qs[16]; value j < 16 is the low nibble of qs[j], value j + 16 its high nibble;
    # x = d * (nibble - 8)
    d = _f16(blocks[:, :2])
    qs = blocks[:, 2:]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).to(torch.int8) - 8
    return d * q.float()


def _q4_k_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit (scale, min) pairs of a Q4_K super-block from their 12 packed bytes: pairs 0-3 are the low 6
    bits of bytes 0-3 / 4-7; pairs 4-7 take their low 4 bits from bytes 8-11 and their top 2 bits from the top 2
    bits of bytes 0-3 / 4-7 (ggml's get_scale_min_k4)."""
    s = packed.reshape(-1, 3, 4)
    sd, sm, smd = s[:, 0], s[:, 1], s[:, 2]
    scales = torch.cat([sd & 0x3F, (smd & 0x0F) | ((sd >> 2) & 0x30)], dim=-1)
    mins = torch.cat([sm & 0x3F, (smd >> 4) | ((sm >> 2) & 0x30)], dim=-1)
    return scales, mins


def _dequantize_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    # super-block of 256: f16 d, f16 dmin, 12 bytes of scales/mins, qs[128]; eight sub-blocks of 32, stored as four
    # 32-byte groups whose low nibbles are sub-block 2g and high nibbles sub-block 2g+1;
    # x = (d * scale) * q - (dmin * min)
    n = blocks.shape[0]
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    sc, mn = _q4_k_scales(blocks[:, 4:16])
    qs = blocks[:, 16:].reshape(n, 4, 32)
    q = torch.stack([qs & 0x0F, qs >> 4], dim=2).reshape(n, 8, 32).float()
    scale = (d * sc.float())[..., None]
    offset = (dmin * mn.float())[..., None]
    return (scale * q - offset).reshape(n, 256)


def _dequantize_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    # super-block of 256: ql[128] (low 4 bits), qh[64] (high 2 bits), int8 scales[16], f16 d; two halves of 128
    # values: ql bytes 0-63 of a half give values 0-63 (low nibble) and 64-127 (high nibble), qh byte l gives the
    # high bits of values l, l+32, l+64, l+96 (bit pairs 0-1, 2-3, 4-5, 6-7); x = (d * scale[v // 16]) * (q - 32)
    n = blocks.shape[0]
    ql = blocks[:, :128].reshape(n, 2, 64)
    qh = blocks[:, 128:192].reshape(n, 2, 32)
    sc = blocks[:, 192:208].contiguous().view(torch.int8).float()
    d = _f16(blocks[:, 208:210])
    low = torch.stack([ql & 0x0F, ql >> 4], dim=2).reshape(n, 8, 32)
    high = torch.stack([qh & 3, (qh >> 2) & 3, (qh >> 4) & 3, (qh >> 6) & 3], dim=2).reshape(n, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    return ((d * sc).reshape(n, 16, 1) * q).reshape(n, 256)


_BLOCK_DEQUANTIZERS: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    Q8_0: _dequantize_q8_0, Q4_0: _dequantize_q4_0, Q4_K: _dequantize_q4_k, Q6_K: _dequantize_q6_k}
_FLOAT_DTYPES = {F32: torch.float32, F16: torch.float16, BF16: torch.bfloat16}


def dequantize(raw: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """Rows of a GGUF tensor as stored (uint8 [..., row_bytes]) -> their values [..., row_len]: F32 / F16 / BF16 in
    their own dtype (no rounding), block types in float32 (bit-exact with ggml's dequantize_row_*)."""
    if raw.dtype != torch.uint8:
        raise TypeError(f"dequantize takes the stored bytes (uint8), got {raw.dtype}")
    if ggml_type in _FLOAT_DTYPES:
        return raw.contiguous().view(_FLOAT_DTYPES[ggml_type])
    if ggml_type not in _BLOCK_DEQUANTIZERS:
        raise GGUFError(f"tensor type {type_name(ggml_type)} is not supported; qwen35 dequantises {_supported_list()}")
    per_block, nbytes = BLOCKS[ggml_type]
    if raw.shape[-1] % nbytes:
        raise GGUFError(f"{type_name(ggml_type)} rows must be whole {nbytes}-byte blocks, got {raw.shape[-1]} bytes")
    lead = raw.shape[:-1]
    values = _BLOCK_DEQUANTIZERS[ggml_type](raw.reshape(-1, nbytes))
    return values.reshape(*lead, raw.shape[-1] // nbytes * per_block)


# ----------------------------------------------------------------------------------------------------------------
# quantisation: values [..., row_len] -> uint8 rows [..., row_bytes]  (ggml's quantize_row_*_ref)


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf (ties away from zero) in float32 arithmetic, as ggml's reference quantiser rounds."""
    a = x.abs()
    f = a.floor()
    return torch.sign(x) * (f + (2 * (a - f)).floor())


def _quantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    # d = max|x| / 127, q = round(x / d) (by the reciprocal, as ggml computes it); d stored as f16
    d = blocks.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = _round_half_away(blocks * inv).to(torch.int8)
    return torch.cat([d.to(torch.float16).view(torch.uint8), q.view(torch.uint8)], dim=-1)


def _quantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    # d = (the value of largest magnitude, sign kept) / -8, q = min(15, trunc(x / d + 8.5)); values 0-15 go to low
    # nibbles, 16-31 to high nibbles
    at = blocks.abs().argmax(-1, keepdim=True)  # the first of equal magnitudes, as ggml's loop keeps
    d = blocks.gather(-1, at) / -8
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.trunc(blocks * inv + 8.5).clamp_(0, 15).to(torch.uint8)
    return torch.cat([d.to(torch.float16).view(torch.uint8), q[:, :16] | (q[:, 16:] << 4)], dim=-1)


def quantize(values: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """Values [..., row_len] (any float dtype) -> the stored bytes (uint8 [..., row_bytes]) of F32 / F16 / BF16 (round
    to nearest even) or Q8_0 / Q4_0 (bit-exact with ggml's quantize_row_*_ref, computed in float32)."""
    if ggml_type in _FLOAT_DTYPES:
        return values.to(_FLOAT_DTYPES[ggml_type]).contiguous().view(torch.uint8)
    if ggml_type not in (Q8_0, Q4_0):
        raise GGUFError(f"quantising to {type_name(ggml_type)} is not supported; qwen35 writes "
                        f"{', '.join(_OWN_NAMES[t] for t in QUANTIZABLE_TYPES)}")
    per_block, nbytes = BLOCKS[ggml_type]
    row = values.shape[-1]
    if row % per_block:
        raise GGUFError(f"{type_name(ggml_type)} needs rows of a multiple of {per_block} values, got {row}")
    blocks = values.float().reshape(-1, per_block)
    packed = (_quantize_q8_0 if ggml_type == Q8_0 else _quantize_q4_0)(blocks)
    return packed.reshape(*values.shape[:-1], row // per_block * nbytes)


# ----------------------------------------------------------------------------------------------------------------
# reading the container


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    ggml_type: int
    shape: tuple[int, ...]  # torch order (the reverse of ggml's ne)
    offset: int  # absolute byte offset in the file

    @property
    def type_name(self) -> str:
        return type_name(self.ggml_type)

    def row_bytes(self) -> int:
        per_block, nbytes = BLOCKS[self.ggml_type]
        return self.shape[-1] // per_block * nbytes

    def nbytes(self) -> int:
        return int(np.prod(self.shape[:-1], dtype=np.int64)) * self.row_bytes()


_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_ARRAY_DTYPES = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
                 7: np.uint8, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9
SUPPORTED_VERSIONS = (2, 3)


class GGUFFile:
    """A GGUF file opened for reading: ``metadata`` (key -> value; arrays as lists), ``tensors`` (name ->
    :class:`GGUFTensorInfo`), and each tensor's bytes as a zero-copy view of the memory-mapped file
    (:meth:`raw`), whose pages :meth:`release` gives back once copied out.  Little-endian GGUF v2 / v3 only."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise GGUFError(f"{self.path}: no such file")
        size = self.path.stat().st_size
        if size < 24:
            raise GGUFError(f"{self.path}: {size} bytes is too short to be a GGUF file")
        fd = os.open(self.path, os.O_RDONLY)
        try:  # a private mapping is writable for torch.frombuffer, and nothing is ever written to it
            self._map = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
        finally:
            os.close(fd)
        try:
            self._parse()
        except (struct.error, UnicodeDecodeError, ValueError, IndexError) as e:
            self.close()
            if isinstance(e, GGUFError):
                raise
            raise GGUFError(f"{self.path}: truncated or malformed GGUF ({e})") from None

    def _parse(self) -> None:
        m = self._map
        if m[:4] != b"GGUF":
            raise GGUFError(f"{self.path}: not a GGUF file (starts with {bytes(m[:4])!r}, not b'GGUF')")
        (version,) = struct.unpack_from("<I", m, 4)
        if version not in SUPPORTED_VERSIONS:
            swapped = struct.unpack_from(">I", m, 4)[0]
            why = " (a big-endian file)" if swapped in SUPPORTED_VERSIONS else ""
            raise GGUFError(f"{self.path}: GGUF version {version}{why} is not supported; qwen35 reads little-endian "
                            f"GGUF v{' / v'.join(map(str, SUPPORTED_VERSIONS))}")
        self.version = version
        n_tensors, n_kv = struct.unpack_from("<QQ", m, 8)
        pos = 24
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key, pos = self._string(pos)
            (vtype,) = struct.unpack_from("<I", m, pos)
            value, pos = self._value(vtype, pos + 4)
            self.metadata[key] = value
        infos = []
        for _ in range(n_tensors):
            name, pos = self._string(pos)
            (n_dims,) = struct.unpack_from("<I", m, pos)
            ne = struct.unpack_from(f"<{n_dims}Q", m, pos + 4)
            pos += 4 + 8 * n_dims
            ggml_type, offset = struct.unpack_from("<IQ", m, pos)
            pos += 12
            infos.append((name, ggml_type, tuple(int(x) for x in reversed(ne)), offset))
        alignment = int(self.metadata.get("general.alignment", 32))
        data_start = -(-pos // alignment) * alignment
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, ggml_type, shape, offset in infos:
            info = GGUFTensorInfo(name, ggml_type, shape, data_start + offset)
            if ggml_type in BLOCKS:
                if shape[-1] % BLOCKS[ggml_type][0]:
                    raise GGUFError(f"{self.path}: tensor {name} ({info.type_name}) has rows of {shape[-1]} values, "
                                    f"not whole {BLOCKS[ggml_type][0]}-value blocks")
                if info.offset + info.nbytes() > len(m):
                    raise GGUFError(f"{self.path}: tensor {name} ends at byte {info.offset + info.nbytes()} but the "
                                    f"file has {len(m)} bytes; the file is truncated")
            self.tensors[name] = info

    def _string(self, pos: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", self._map, pos)
        end = pos + 8 + n
        if end > len(self._map):
            raise GGUFError(f"{self.path}: a string at byte {pos} runs past the end of the file (truncated)")
        return self._map[pos + 8:end].decode("utf-8"), end

    def _value(self, vtype: int, pos: int) -> tuple[Any, int]:
        m = self._map
        if vtype in _SCALARS:
            fmt = "<" + _SCALARS[vtype]
            return struct.unpack_from(fmt, m, pos)[0], pos + struct.calcsize(fmt)
        if vtype == _STRING:
            return self._string(pos)
        if vtype != _ARRAY:
            raise GGUFError(f"{self.path}: unknown metadata value type {vtype} at byte {pos}")
        etype, count = struct.unpack_from("<IQ", m, pos)
        pos += 12
        if etype in _ARRAY_DTYPES:
            dt = np.dtype(_ARRAY_DTYPES[etype]).newbyteorder("<")
            arr = np.frombuffer(m, dtype=dt, count=count, offset=pos)
            values = arr.astype(bool).tolist() if etype == 7 else arr.tolist()
            return values, pos + count * dt.itemsize
        if etype == _STRING:  # the vocabulary: one length-prefixed string after another
            out = []
            unpack, data = struct.Struct("<Q").unpack_from, m
            for _ in range(count):
                (n,) = unpack(data, pos)
                out.append(data[pos + 8:pos + 8 + n].decode("utf-8"))
                pos += 8 + n
            return out, pos
        values = []
        for _ in range(count):  # arrays of arrays: not used by llama.cpp's writers, read for completeness
            v, pos = self._value(etype, pos)
            values.append(v)
        return values, pos

    def raw(self, name: str) -> torch.Tensor:
        """The stored bytes of tensor ``name`` as uint8 [*shape[:-1], row_bytes], a view of the mapped file."""
        info = self.tensors[name]
        if info.ggml_type not in BLOCKS:
            raise GGUFError(f"{self.path}: tensor {name} is {info.type_name}; qwen35 dequantises {_supported_list()}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flat = torch.frombuffer(self._map, dtype=torch.uint8, count=info.nbytes(), offset=info.offset)
        return flat.view(*info.shape[:-1], info.row_bytes())

    def release(self, name: str, rows: slice = slice(None)) -> None:
        """Give the pages of tensor ``name`` (of its ``rows`` along dim 0) back to the OS; they are re-read from
        disk if touched again."""
        info = self.tensors[name]
        if info.ggml_type not in BLOCKS or not hasattr(self._map, "madvise"):
            return
        per_row = info.nbytes() // info.shape[0] if len(info.shape) > 1 else info.nbytes()
        start, stop, _ = rows.indices(info.shape[0] if len(info.shape) > 1 else 1)
        page = mmap.PAGESIZE
        lo = (info.offset + start * per_row) // page * page
        hi = (info.offset + stop * per_row) // page * page  # a partial last page may hold bytes still to be read
        if hi > lo:
            self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def close(self) -> None:
        try:
            self._map.close()
        except BufferError:  # a tensor view is still alive; the mapping goes when it does
            pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a GGUF file (key -> value), tokenizer arrays included; no tensor data is read."""
    with GGUFFile(path) as f:
        return dict(f.metadata)


# ----------------------------------------------------------------------------------------------------------------
# GGUF metadata <-> ModelConfig


def _architecture(meta: Mapping[str, Any], source: str) -> str:
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise GGUFError(f"{source}: general.architecture is {arch!r}, not a Qwen3.5 model; qwen35 reads GGUF files "
                        f"of the {' and '.join(repr(a) for a in GGUF_ARCHITECTURES)} architectures")
    return arch


def _float32_literal(x: float) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999997e-07 -> 1e-06)."""
    return float(str(np.float32(x)))


def config_from_gguf(meta: Mapping[str, Any], tensors: Mapping[str, GGUFTensorInfo], source: str) -> ModelConfig:
    """The text-only config (``qwen3_5_text`` / ``qwen3_5_moe_text``) a GGUF's metadata describes; the vocabulary
    size and tying come from the tensors (``token_embd`` rows; no ``output.weight`` = tied head)."""
    arch = _architecture(meta, source)
    moe = GGUF_ARCHITECTURES[arch]

    def get(key: str, kind: type | tuple[type, ...] = int, default: Any = ...) -> Any:
        full = f"{arch}.{key}"
        if full not in meta:
            if default is ...:
                raise GGUFError(f"{source}: metadata key {full!r} is missing")
            return default
        value = meta[full]
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise GGUFError(f"{source}: metadata key {full!r} is {value!r}, expected {getattr(kind, '__name__', kind)}")
        return value

    if "token_embd.weight" not in tensors:
        raise GGUFError(f"{source}: has no token_embd.weight tensor")
    n_all = get("block_count")
    n_mtp = get("nextn_predict_layers", int, 0)
    n_layers = n_all - n_mtp
    head_dim = get("attention.key_length")
    if get("attention.value_length", int, head_dim) != head_dim:
        raise GGUFError(f"{source}: {arch}.attention.value_length differs from key_length; Qwen3.5 attention uses one "
                        "head size for keys and values")
    recurrent = meta.get(f"{arch}.attention.recurrent_layers")
    if recurrent is not None:
        if not isinstance(recurrent, list) or len(recurrent) < n_layers:
            raise GGUFError(f"{source}: {arch}.attention.recurrent_layers must list at least {n_layers} layers, got "
                            f"{recurrent!r}")
        layer_types = ["linear_attention" if r else "full_attention" for r in recurrent[:n_layers]]
    else:
        interval = get("full_attention_interval", int, 4)
        layer_types = ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(n_layers)]
    sections = meta.get(f"{arch}.rope.dimension_sections", [11, 11, 10, 0])
    if not isinstance(sections, list) or len(sections) < 3 or any(sections[3:]):
        raise GGUFError(f"{source}: {arch}.rope.dimension_sections is {sections!r}; Qwen3.5 uses three M-RoPE sections "
                        "(time, height, width) and a zero fourth")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": _float32_literal(get("rope.freq_base", float)),
                            "partial_rotary_factor": get("rope.dimension_count") / head_dim,
                            "mrope_section": list(sections[:3]), "mrope_interleaved": True}
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling == "yarn":
        rope.update(rope_type="yarn", factor=_float32_literal(get("rope.scaling.factor", float)),
                    original_max_position_embeddings=get("rope.scaling.original_context_length"))
        for key, ours in (("rope.scaling.yarn_beta_fast", "beta_fast"), ("rope.scaling.yarn_beta_slow", "beta_slow"),
                          ("rope.scaling.yarn_attn_factor", "attention_factor")):
            if f"{arch}.{key}" in meta:
                rope[ours] = _float32_literal(get(key, float))
    elif scaling != "none":
        raise GGUFError(f"{source}: {arch}.rope.scaling.type is {scaling!r}; Qwen3.5 uses plain RoPE or YaRN")
    n_v_heads = get("ssm.time_step_rank")
    d: dict[str, Any] = {
        "model_type": "qwen3_5_moe_text" if moe else "qwen3_5_text",
        "architectures": ["Qwen3_5MoeForCausalLM" if moe else "Qwen3_5ForCausalLM"],
        "vocab_size": tensors["token_embd.weight"].shape[0],
        "hidden_size": get("embedding_length"),
        "num_hidden_layers": n_layers,
        "layer_types": layer_types,
        "num_attention_heads": get("attention.head_count"),
        "num_key_value_heads": get("attention.head_count_kv"),
        "head_dim": head_dim,
        "linear_num_key_heads": get("ssm.group_count"),
        "linear_num_value_heads": n_v_heads,
        "linear_key_head_dim": get("ssm.state_size"),
        "linear_value_head_dim": get("ssm.inner_size") // n_v_heads,
        "linear_conv_kernel_dim": get("ssm.conv_kernel"),
        "rope_parameters": rope,
        "rms_norm_eps": _float32_literal(get("attention.layer_norm_rms_epsilon", float)),
        "max_position_embeddings": get("context_length"),
        "tie_word_embeddings": "output.weight" not in tensors,
        "mtp_num_hidden_layers": n_mtp if any(".nextn." in n for n in tensors) else 0,
    }
    for key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                          ("pad_token_id", "padding_token_id")):
        if isinstance(meta.get(f"tokenizer.ggml.{gguf_key}"), int):
            d[key] = meta[f"tokenizer.ggml.{gguf_key}"]
    if moe:
        d.update(num_experts=get("expert_count"), num_experts_per_tok=get("expert_used_count"),
                 moe_intermediate_size=get("expert_feed_forward_length"),
                 shared_expert_intermediate_size=get("expert_shared_feed_forward_length"))
    else:
        d["intermediate_size"] = get("feed_forward_length")
    return config_from_dict(d, source)


# ----------------------------------------------------------------------------------------------------------------
# parameter <-> GGUF tensor placements


def _plus_one(w: torch.Tensor) -> torch.Tensor:
    return w.float() + 1


def _minus_one(w: torch.Tensor) -> torch.Tensor:
    return w.float() - 1


def _neg_exp(a_log: torch.Tensor) -> torch.Tensor:
    return -torch.exp(a_log.float())


def _a_log_from_a(a: torch.Tensor) -> torch.Tensor:
    """A_log (float32) with -exp(A_log) == a exactly, where a float32 with that property exists.

    log(-a) rounded to float32 may sit an ulp or two from such a value, so the neighbours are tried too; each is
    checked with exp over the whole [n_v] vector, as GatedDeltaNet.gates evaluates it, because torch's vectorised
    and scalar expf may differ in the last bit."""
    target = (-a.float()).contiguous()
    guess = torch.log(target.double()).float()
    best, found = guess.clone(), torch.exp(guess) == target
    up, down = guess, guess
    for _ in range(4):
        up, down = torch.nextafter(up, up + 1), torch.nextafter(down, down - 1)
        for cand in (up, down):
            hit = (torch.exp(cand) == target) & ~found
            best = torch.where(hit, cand, best)
            found |= hit
    return best


def _tiled_order(n_k: int, per_k: int, width: int) -> torch.Tensor:
    """The converter's value-head reorder as an index: row i of the GGUF tensor is row ``order[i]`` of ours (value
    head r of key group g, ``width`` rows each, moves from g * per_k + r to r * n_k + g)."""
    return torch.arange(n_k * per_k * width).reshape(n_k, per_k, width).permute(1, 0, 2).reshape(-1)


@dataclass(frozen=True, eq=False)
class Placement:
    """One GGUF tensor and the part of one parameter it holds.

    ``select`` picks the view of the parameter the tensor fills (the whole parameter when None) -- it has the
    tensor's shape; ``rows[i]`` is the view row that GGUF row i holds, ``cols[j]`` the view column GGUF column j
    holds (None: the same order); ``to_gguf`` / ``from_gguf`` are the elementwise value maps (float32)."""

    gguf_name: str
    param: str
    shape: tuple[int, ...]
    select: Callable[[torch.Tensor], torch.Tensor] | None = None
    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None
    to_gguf: Callable[[torch.Tensor], torch.Tensor] | None = None
    from_gguf: Callable[[torch.Tensor], torch.Tensor] | None = None

    def view(self, param: torch.Tensor) -> torch.Tensor:
        return param if self.select is None else self.select(param)


NORM = (_plus_one, _minus_one)  # zero-centred RMSNorm weights are stored as 1 + w
A_LOG = (_neg_exp, _a_log_from_a)

# Our names inside a decoder layer -> llama.cpp's (``blk.N.`` + name), and the value map; DeltaNet tensors whose
# value heads the converter reorders are marked by how (see _layer_placements).
_LAYER_NAMES: dict[str, tuple[str, tuple | None]] = {
    "input_layernorm.weight": ("attn_norm.weight", NORM),
    "post_attention_layernorm.weight": ("post_attention_norm.weight", NORM),
    "linear_attn.in_proj_qkv.weight": ("attn_qkv.weight", None),
    "linear_attn.in_proj_z.weight": ("attn_gate.weight", None),
    "linear_attn.in_proj_b.weight": ("ssm_beta.weight", None),
    "linear_attn.in_proj_a.weight": ("ssm_alpha.weight", None),
    "linear_attn.conv1d.weight": ("ssm_conv1d.weight", None),
    "linear_attn.A_log": ("ssm_a", A_LOG),
    "linear_attn.dt_bias": ("ssm_dt.bias", None),
    "linear_attn.norm.weight": ("ssm_norm.weight", None),  # the gated norm: a plain weight, not 1 + w
    "linear_attn.out_proj.weight": ("ssm_out.weight", None),
    "self_attn.q_proj.weight": ("attn_q.weight", None),  # [q | gate] per head, as in the checkpoint
    "self_attn.k_proj.weight": ("attn_k.weight", None),
    "self_attn.v_proj.weight": ("attn_v.weight", None),
    "self_attn.o_proj.weight": ("attn_output.weight", None),
    "self_attn.q_norm.weight": ("attn_q_norm.weight", NORM),
    "self_attn.k_norm.weight": ("attn_k_norm.weight", NORM),
    "mlp.gate_proj.weight": ("ffn_gate.weight", None),
    "mlp.up_proj.weight": ("ffn_up.weight", None),
    "mlp.down_proj.weight": ("ffn_down.weight", None),
    "mlp.gate.weight": ("ffn_gate_inp.weight", None),
    "mlp.experts.down_proj": ("ffn_down_exps.weight", None),
    "mlp.shared_expert.gate_proj.weight": ("ffn_gate_shexp.weight", None),
    "mlp.shared_expert.up_proj.weight": ("ffn_up_shexp.weight", None),
    "mlp.shared_expert.down_proj.weight": ("ffn_down_shexp.weight", None),
    "mlp.shared_expert_gate.weight": ("ffn_gate_inp_shexp.weight", None),
}
# the MTP block's own tensors (block L = num_hidden_layers) and its norms
_NEXTN_NAMES = {"mtp.fc.weight": ("nextn.eh_proj.weight", None),
                "mtp.pre_fc_norm_embedding.weight": ("nextn.enorm.weight", NORM),
                "mtp.pre_fc_norm_hidden.weight": ("nextn.hnorm.weight", NORM),
                "mtp.norm.weight": ("nextn.shared_head_norm.weight", NORM)}
_LAYER = re.compile(r"^(model|mtp)\.layers\.(\d+)\.(.+)$")


def _layer_placements(pname: str, rest: str, block: int, shape: tuple[int, ...], cfg: TextConfig
                      ) -> list[Placement]:
    prefix = f"blk.{block}."
    if rest == "mlp.experts.gate_up_proj":  # [E, 2I, H]: gate rows first
        inter = shape[1] // 2
        part = (shape[0], inter, shape[2])
        return [Placement(prefix + "ffn_gate_exps.weight", pname, part, select=lambda p: p[:, :inter]),
                Placement(prefix + "ffn_up_exps.weight", pname, part, select=lambda p: p[:, inter:])]
    if rest not in _LAYER_NAMES:
        raise GGUFError(f"parameter {pname} has no GGUF counterpart (llama.cpp's qwen35 tensors have no {rest})")
    name, values = _LAYER_NAMES[rest]
    to_gguf, from_gguf = values if values is not None else (None, None)
    select, rows, cols, gshape = None, None, None, shape
    if rest == "linear_attn.conv1d.weight":  # [C, 1, K] -> [C, K]
        select, gshape = (lambda p: p[:, 0, :]), (shape[0], shape[2])
    per_k = cfg.linear_num_value_heads // cfg.linear_num_key_heads
    if rest.startswith("linear_attn.") and per_k > 1:
        n_k, dv = cfg.linear_num_key_heads, cfg.linear_value_head_dim
        if rest in ("linear_attn.in_proj_qkv.weight", "linear_attn.conv1d.weight"):  # only the V rows / channels
            qk = 2 * cfg.linear_key_dim
            rows = torch.cat([torch.arange(qk), qk + _tiled_order(n_k, per_k, dv)])
        elif rest == "linear_attn.in_proj_z.weight":
            rows = _tiled_order(n_k, per_k, dv)
        elif rest in ("linear_attn.in_proj_a.weight", "linear_attn.in_proj_b.weight", "linear_attn.A_log",
                      "linear_attn.dt_bias"):
            rows = _tiled_order(n_k, per_k, 1)
        elif rest == "linear_attn.out_proj.weight":
            cols = _tiled_order(n_k, per_k, dv)
    return [Placement(prefix + name, pname, gshape, select, rows, cols, to_gguf, from_gguf)]


def placements(model: Qwen35ForCausalLM) -> list[Placement]:
    """Every GGUF tensor of ``model`` (a Qwen35ForCausalLM), in llama.cpp's names: token_embd, the blocks, the MTP
    block, output_norm, output (absent when the head is tied)."""
    cfg = model.config.text
    out: list[Placement] = []
    tail: list[Placement] = []
    for pname, p in _expected_params(model).items():
        shape = tuple(p.shape)
        if pname.startswith("visual."):
            continue  # llama.cpp keeps the vision tower in a separate mmproj file
        if pname == "model.embed_tokens.weight":
            out.insert(0, Placement("token_embd.weight", pname, shape))
        elif pname == "model.norm.weight":
            tail.insert(0, Placement("output_norm.weight", pname, shape, to_gguf=_plus_one, from_gguf=_minus_one))
        elif pname == "lm_head.weight":
            tail.append(Placement("output.weight", pname, shape))
        elif pname in _NEXTN_NAMES:
            name, (to_gguf, from_gguf) = _NEXTN_NAMES[pname][0], (_NEXTN_NAMES[pname][1] or (None, None))
            out.append(Placement(f"blk.{cfg.num_hidden_layers}.{name}", pname, shape, to_gguf=to_gguf,
                                 from_gguf=from_gguf))
        elif m := _LAYER.match(pname):
            block = int(m.group(2)) + (cfg.num_hidden_layers if m.group(1) == "mtp" else 0)
            out.extend(_layer_placements(pname, m.group(3), block, shape, cfg))
        else:
            raise GGUFError(f"parameter {pname} has no GGUF counterpart")
    return out + tail


def gguf_tensor_names(model: Qwen35ForCausalLM) -> list[str]:
    """The GGUF tensor names :func:`save_gguf` writes for ``model``."""
    return [pl.gguf_name for pl in placements(model)]


def _inverse(index: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(index)
    inv[index] = torch.arange(index.numel())
    return inv


def _row_slabs(n_rows: int, row_bytes: int, slab_bytes: int = 32 * 1024 ** 2) -> Iterator[slice]:
    step = max(1, slab_bytes // max(row_bytes, 1))
    for r in range(0, n_rows, step):
        yield slice(r, min(n_rows, r + step))


# ----------------------------------------------------------------------------------------------------------------
# loading


def load_gguf(path: str | os.PathLike, dtype: str | torch.dtype | None = "auto", device: str = "cpu",
              progress: bool | None = None) -> Qwen35ForCausalLM:
    """Load a llama.cpp GGUF of a Qwen3.5 / Qwen3.6 model (``qwen35`` / ``qwen35moe``) into a Qwen35ForCausalLM.

    ``dtype``: "auto" (float32 when every tensor is F32, else bfloat16), "bfloat16", "float32" or "float16";
    quantised tensors are dequantised into it.  The config comes from the file's metadata (text-only: a GGUF holds
    no vision tower); the MTP block is built when the file holds its ``blk.L.nextn.*`` tensors.  Other architectures
    and tensor types other than F32, F16, BF16, Q8_0, Q4_0, Q4_K and Q6_K are refused by name."""
    from ..model import Qwen35ForCausalLM

    f = GGUFFile(path)
    source = str(f.path)
    try:
        config = config_from_gguf(f.metadata, f.tensors, source)
        unsupported = [(n, t.type_name) for n, t in f.tensors.items() if t.ggml_type not in BLOCKS]
        if unsupported:
            n, t = unsupported[0]
            more = f" (and {len(unsupported) - 1} more tensors)" if len(unsupported) > 1 else ""
            raise GGUFError(f"{source}: tensor {n} is {t}{more}; qwen35 dequantises {_supported_list()}")
        stored = {t.ggml_type for t in f.tensors.values()}
        target = resolve_dtype(dtype, torch.float32 if stored <= {F32} else torch.bfloat16)
        with_mtp = config.text.mtp_num_hidden_layers > 0
        with torch.device("meta"):
            model = Qwen35ForCausalLM(config, mtp=with_mtp)
        model.to(target)
        expected = _expected_params(model)
        for name, p in expected.items():
            p.requires_grad_(False)
            if name.endswith(KEEP_FP32):
                p.data = p.data.float()

        plan = placements(model)
        names = {pl.gguf_name for pl in plan}
        missing = [pl.gguf_name for pl in plan if pl.gguf_name not in f.tensors]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise GGUFError(f"{source}: missing tensor(s) {', '.join(missing[:5])}{more} for a model with this "
                            "metadata")
        unexpected = [n for n in f.tensors if n not in names]
        if unexpected:
            raise GGUFError(f"{source}: unexpected tensor {unexpected[0]}: no such weight in a "
                            f"{config.model_type} model with this metadata")
        for pl in plan:
            have = f.tensors[pl.gguf_name].shape
            if have != pl.shape:
                raise GGUFError(f"{source}: tensor {pl.gguf_name} has shape {list(have)} (torch order), expected "
                                f"{list(pl.shape)} from the metadata")

        total = sum(f.tensors[pl.gguf_name].nbytes() for pl in plan)
        show = progress if progress is not None else total >= PROGRESS_BYTES
        bar = None
        if show:
            from tqdm import tqdm
            bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {f.path.name}", leave=False)
        with torch.no_grad():
            for pl in plan:
                dst = expected[pl.param]
                if dst.is_meta:  # first tensor for this parameter: give it memory, filled exactly once
                    dst = _materialize(model, pl.param, dst, device)
                    expected[pl.param] = dst
                _read_into(f, pl, pl.view(dst))
                if bar is not None:
                    bar.update(f.tensors[pl.gguf_name].nbytes())
        if bar is not None:
            bar.close()
    finally:
        f.close()
    if config.text.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.eval()
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:  # cannot happen when the coverage check passed; guard against silent garbage
        raise GGUFError(f"{source}: no data was loaded for {', '.join(leftover[:5])}")
    return model


def _read_into(f: GGUFFile, pl: Placement, view: torch.Tensor) -> None:
    """Dequantise one GGUF tensor slab by slab into ``view`` (the part of the parameter it holds), undoing the
    converter's reorder and value map on the way."""
    info = f.tensors[pl.gguf_name]
    raw = f.raw(pl.gguf_name)
    inv_cols = _inverse(pl.cols) if pl.cols is not None else None
    if raw.dim() == 1:  # a 1-D tensor is one slab
        slabs: Iterator[slice] = iter([slice(None)])
    else:  # slabs sized by their float32 values, not by their (up to 7x smaller) stored bytes
        slabs = _row_slabs(raw.shape[0], int(np.prod(info.shape[1:])) * 4)
    for rows in slabs:
        values = dequantize(raw[rows], info.ggml_type)
        if inv_cols is not None:
            values = values.index_select(-1, inv_cols)
        if pl.from_gguf is not None:
            values = pl.from_gguf(values)
        if pl.rows is None:
            view[rows].copy_(values)
        else:
            view.index_copy_(0, pl.rows[rows], values.to(view.dtype))
        del values
        f.release(pl.gguf_name, rows)


# ----------------------------------------------------------------------------------------------------------------
# saving

FILE_TYPES = ("bf16", "q8_0", "q4_0")
# llama.cpp's general.file_type (LlamaFileType MOSTLY_*) and the type of the large matrices
_FILE_TYPE_IDS = {"bf16": 32, "q8_0": 7, "q4_0": 2}
_MAIN_TYPE = {"bf16": BF16, "q8_0": Q8_0, "q4_0": Q4_0}
# kept at 8 bits in a q4_0 file: the embedding and head, the DeltaNet decay / write-strength projections and the MTP
# input projection (issue 18's high-precision exceptions; routers and shared-expert gates are F32 anyway)
_Q4_0_KEEP_8BIT = ("token_embd.weight", "output.weight", "ssm_alpha.weight", "ssm_beta.weight", "nextn.eh_proj.weight")
# always F32, as the converter writes them: routers and the short convolution (besides 1-D tensors and norms)
_ALWAYS_F32 = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight", "ssm_conv1d.weight")


def tensor_type_for(gguf_name: str, shape: tuple[int, ...], file_type: str) -> int:
    """The ggml type :func:`save_gguf` writes a tensor in (the converter's rules, plus the q4_0 exceptions)."""
    if (len(shape) <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight")
            or gguf_name.endswith(_ALWAYS_F32)):
        return F32
    ggml_type = _MAIN_TYPE[file_type]
    if file_type == "q4_0" and gguf_name.endswith(_Q4_0_KEEP_8BIT):
        ggml_type = Q8_0
    if ggml_type in (Q8_0, Q4_0) and shape[-1] % BLOCKS[ggml_type][0]:
        return F16  # rows that are not whole blocks: the converter's fallback
    return ggml_type


def _gguf_tensor(pl: Placement, view: torch.Tensor, ggml_type: int) -> np.ndarray:
    """One GGUF tensor's stored bytes, made slab by slab from the parameter view."""
    pieces = []
    slabs = [slice(None)] if view.dim() == 1 else list(_row_slabs(view.shape[0], view[0].numel() * 4))
    for rows in slabs:
        if pl.rows is None:
            values = view[rows]
        else:
            values = view.index_select(0, pl.rows[rows])
        if pl.cols is not None:
            values = values.index_select(-1, pl.cols)
        if pl.to_gguf is not None:
            values = pl.to_gguf(values)
        pieces.append(quantize(values, ggml_type).numpy())
    out = pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=0)
    return np.ascontiguousarray(out)


# tokenizer.json pre-tokenizer of the Qwen3.5 vocabulary: its regex lets letters absorb combining marks, which is
# what llama.cpp's "qwen35" pre-tokenizer implements (Qwen2's regex has \p{L}+ alone)
_QWEN35_REGEX_MARK = r"[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+"
# GGUF token types (llama.cpp's llama_token_type)
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5


def _looks_special(token: str) -> bool:
    """The converter's does_token_look_special: added tokens of these forms become CONTROL even when not special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _split_patterns(pre: Any) -> list[str]:
    """The regexes of every Split step of a tokenizer.json pre_tokenizer (nested Sequences included)."""
    if isinstance(pre, list):
        return [p for item in pre for p in _split_patterns(item)]
    if not isinstance(pre, dict):
        return []
    found = []
    pattern = pre.get("pattern")
    if pre.get("type") == "Split" and isinstance(pattern, dict) and isinstance(pattern.get("Regex"), str):
        found.append(pattern["Regex"])
    return found + _split_patterns(pre.get("pretokenizers"))


def _read_json(path: Path) -> dict[str, Any]:
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GGUFError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise GGUFError(f"{path}: expected a JSON object")
    return data


def tokenizer_metadata(folder: str | os.PathLike, vocab_size: int, config: ModelConfig | None = None
                       ) -> dict[str, Any]:
    """The ``tokenizer.*`` GGUF metadata of a checkpoint folder's tokenizer, as llama.cpp's converter writes it:
    model "gpt2", pre "qwen35", one token per model vocabulary row (``[PAD{i}]`` UNUSED where the tokenizer has
    none), NORMAL / CONTROL / USER_DEFINED types, the merges, special ids (tokenizer_config names, then the
    config's ids), add_bos / add_eos, and the chat template (``chat_template.jinja``, else tokenizer_config's)."""
    folder = Path(folder)
    tok_file = folder / "tokenizer.json"
    if not tok_file.is_file():
        raise GGUFError(f"{tok_file}: file not found (a GGUF carries the tokenizer, so save_gguf needs one)")
    tok = _read_json(tok_file)
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise GGUFError(f"{tok_file}: not a BPE tokenizer; a Qwen3.5 GGUF carries a byte-level BPE vocabulary")
    if not any(_QWEN35_REGEX_MARK in pattern for pattern in _split_patterns(tok.get("pre_tokenizer"))):
        raise GGUFError(f"{tok_file}: the pre-tokenizer is not Qwen3.5's (no {_QWEN35_REGEX_MARK} split), so the file "
                        "could not honestly say tokenizer.ggml.pre = 'qwen35'")
    tcfg = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    added = {int(a["id"]): a for a in tok.get("added_tokens", []) if isinstance(a, dict) and "id" in a}
    by_id: dict[int, tuple[str, int]] = {}
    for text, idx in model["vocab"].items():
        by_id[int(idx)] = (text, TOKEN_NORMAL)
    for idx, a in added.items():
        text = a["content"]
        by_id[idx] = (text, TOKEN_CONTROL if a.get("special") or _looks_special(text) else TOKEN_USER_DEFINED)
    if by_id and max(by_id) >= vocab_size:
        raise GGUFError(f"{tok_file}: token id {max(by_id)} does not fit the model's vocabulary of {vocab_size} rows")
    tokens, types = [], []
    for i in range(vocab_size):
        text, kind = by_id.get(i, (f"[PAD{i}]", TOKEN_UNUSED))
        tokens.append(text)
        types.append(kind)
    merges = []
    for m in model.get("merges") or []:
        if isinstance(m, str):
            merges.append(m)
        elif isinstance(m, (list, tuple)) and len(m) == 2:  # newer tokenizer.json: spaces inside a part are kept as
            # U+0120 in the GGUF, as the converter encodes them
            merges.append(" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in m))
        else:
            raise GGUFError(f"{tok_file}: merge {m!r} is neither 'a b' nor ['a', 'b']")
    meta: dict[str, Any] = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen35",
                            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
                            "tokenizer.ggml.merges": merges}
    content_ids = {a["content"]: idx for idx, a in added.items()}
    ids: dict[str, int] = {}
    # (tokenizer_config / config name, GGUF key; "seperator" is llama.cpp's spelling); the converter resolves cls
    # too but has no GGUF key to write it under
    for kind, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("sep", "seperator"),
                      ("pad", "padding"), ("mask", "mask")):
        entry = tcfg.get(f"{kind}_token")
        text = entry.get("content") if isinstance(entry, dict) else entry
        if isinstance(text, str) and text in content_ids and content_ids[text] < vocab_size:
            ids[key] = content_ids[text]
        elif config is not None:
            value = getattr(config.text, f"{kind}_token_id", None)
            if isinstance(value, int) and 0 <= value < vocab_size:
                ids[key] = value
    for key in ("bos", "eos", "unknown", "seperator", "padding", "mask"):
        if key in ids:
            meta[f"tokenizer.ggml.{key}_token_id"] = ids[key]
    # a byte-level post-processor adds nothing: llama.cpp reads False unless the config asks for a token
    meta["tokenizer.ggml.add_bos_token"] = bool(tcfg.get("add_bos_token", False))
    meta["tokenizer.ggml.add_eos_token"] = bool(tcfg.get("add_eos_token", False))
    template = None
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    elif isinstance(tcfg.get("chat_template"), str):
        template = tcfg["chat_template"]
    if template:
        meta["tokenizer.chat_template"] = template
    return meta


def _model_metadata(model: Qwen35ForCausalLM, arch: str, file_type: str) -> list[tuple[str, str, Any]]:
    """(key, value kind, value) of the model keys, in the converter's order and with its value types."""
    cfg = model.config.text
    mtp = getattr(model, "mtp", None)
    n_mtp = len(mtp.layers) if mtp is not None else 0
    a = arch + "."
    rope = cfg.rope
    meta: list[tuple[str, str, Any]] = [
        ("general.type", "str", "model"),
        (a + "block_count", "u32", cfg.num_hidden_layers + n_mtp),
        (a + "context_length", "u32", cfg.max_position_embeddings),
        (a + "embedding_length", "u32", cfg.hidden_size),
    ]
    if not cfg.is_moe:
        meta.append((a + "feed_forward_length", "u32", cfg.intermediate_size))
    meta += [(a + "attention.head_count", "u32", cfg.num_attention_heads),
             (a + "attention.head_count_kv", "u32", cfg.num_key_value_heads)]
    if rope.rope_type == "yarn":
        meta += [(a + "rope.scaling.type", "str", "yarn"), (a + "rope.scaling.factor", "f32", rope.factor),
                 (a + "rope.scaling.original_context_length", "u32", rope.original_max_position_embeddings)]
        if rope.attention_factor is not None:
            meta.append((a + "rope.scaling.yarn_attn_factor", "f32", rope.attention_factor))
        if rope.beta_fast != 32.0:
            meta.append((a + "rope.scaling.yarn_beta_fast", "f32", rope.beta_fast))
        if rope.beta_slow != 1.0:
            meta.append((a + "rope.scaling.yarn_beta_slow", "f32", rope.beta_slow))
    meta += [(a + "rope.dimension_sections", "i32[]", [*rope.mrope_section, 0]),
             (a + "rope.freq_base", "f32", rope.theta),
             (a + "attention.layer_norm_rms_epsilon", "f32", cfg.rms_norm_eps)]
    if cfg.is_moe:
        meta += [(a + "expert_count", "u32", cfg.num_experts), (a + "expert_used_count", "u32", cfg.num_experts_per_tok)]
    meta += [(a + "attention.key_length", "u32", cfg.head_dim), (a + "attention.value_length", "u32", cfg.head_dim),
             ("general.file_type", "u32", _FILE_TYPE_IDS[file_type])]
    if cfg.is_moe:
        meta += [(a + "expert_feed_forward_length", "u32", cfg.moe_intermediate_size),
                 (a + "expert_shared_feed_forward_length", "u32", cfg.shared_expert_intermediate_size)]
    meta += [
        (a + "ssm.conv_kernel", "u32", cfg.linear_conv_kernel_dim),
        (a + "ssm.state_size", "u32", cfg.linear_key_head_dim),
        (a + "ssm.group_count", "u32", cfg.linear_num_key_heads),
        (a + "ssm.time_step_rank", "u32", cfg.linear_num_value_heads),
        (a + "ssm.inner_size", "u32", cfg.linear_value_dim),
        # the MTP layers are full attention; llama.cpp reads this list, so full_attention_interval is only a
        # fallback (the converter writes 4 whatever the layers are)
        (a + "attention.recurrent_layers", "bool[]",
         [t == "linear_attention" for t in cfg.layer_types] + [False] * n_mtp),
        (a + "full_attention_interval", "u32", 4),
        (a + "rope.dimension_count", "u32", cfg.rotary_dim),
    ]
    if n_mtp:
        meta.append((a + "nextn_predict_layers", "u32", n_mtp))
    meta.append(("general.quantization_version", "u32", 2))
    return meta


def save_gguf(model: Qwen35ForCausalLM, tokenizer_folder: str | os.PathLike, path: str | os.PathLike,
              file_type: str = "bf16", name: str | None = None) -> Path:
    """Write ``model`` (a Qwen35ForCausalLM) as a GGUF llama.cpp loads: the converter's metadata keys and tensor
    layout, the tokenizer and chat template of ``tokenizer_folder`` (a folder with tokenizer.json).

    ``file_type``: "bf16", "q8_0" or "q4_0" (see the module docstring for which tensors stay F32 / Q8_0 / F16).
    ``name``: general.name (default: the file name without ".gguf").  Needs the ``gguf`` package."""
    try:
        import gguf
    except ImportError:
        raise GGUFError("save_gguf writes through the gguf package: pip install gguf") from None
    if file_type not in FILE_TYPES:
        raise GGUFError(f"file_type must be one of {', '.join(FILE_TYPES)}, got {file_type!r}")
    cfg = model.config.text
    if cfg.attention_bias:
        raise GGUFError("this model has attention biases; llama.cpp's qwen35 architectures have none")
    out = Path(path)
    arch = "qwen35moe" if cfg.is_moe else "qwen35"
    plan = placements(model)
    from ..model import Qwen35ForCausalLM

    with torch.device("meta"):  # what a float model of this config holds: a quantized one lacks plain weights
        full = Qwen35ForCausalLM(model.config, mtp=getattr(model, "mtp", None) is not None)
    lacking = sorted(set(gguf_tensor_names(full)) - {pl.gguf_name for pl in plan})
    if lacking:
        raise GGUFError(f"the model has no float weight for {', '.join(lacking[:3])}"
                        f"{' ...' if len(lacking) > 3 else ''}; save_gguf writes float models (export before "
                        "quantize_int8)")
    params = dict(model.named_parameters())
    vocab_meta = tokenizer_metadata(tokenizer_folder, cfg.vocab_size, model.config)

    writer = gguf.GGUFWriter(out, arch)
    writer.add_name(name if name is not None else out.stem)
    kinds = {"str": writer.add_string, "u32": writer.add_uint32, "f32": writer.add_float32,
             "i32[]": writer.add_array, "bool[]": writer.add_array}
    for key, kind, value in _model_metadata(model, arch, file_type):
        kinds[kind](key, value)
    writer.add_tokenizer_model(vocab_meta["tokenizer.ggml.model"])
    writer.add_tokenizer_pre(vocab_meta["tokenizer.ggml.pre"])
    writer.add_token_list(vocab_meta["tokenizer.ggml.tokens"])
    writer.add_token_types(vocab_meta["tokenizer.ggml.token_type"])
    if vocab_meta["tokenizer.ggml.merges"]:
        writer.add_token_merges(vocab_meta["tokenizer.ggml.merges"])
    for key, value in vocab_meta.items():
        if key.endswith("_token_id"):
            writer.add_uint32(key, value)
    writer.add_bool("tokenizer.ggml.add_bos_token", vocab_meta["tokenizer.ggml.add_bos_token"])
    writer.add_bool("tokenizer.ggml.add_eos_token", vocab_meta["tokenizer.ggml.add_eos_token"])
    if "tokenizer.chat_template" in vocab_meta:
        writer.add_chat_template(vocab_meta["tokenizer.chat_template"])

    # tensor directory first (sizes are known from shapes), then the data one tensor at a time
    types = []
    for pl in plan:
        ggml_type = tensor_type_for(pl.gguf_name, pl.shape, file_type)
        types.append(ggml_type)
        per_block, nbytes = BLOCKS[ggml_type]
        size = int(np.prod(pl.shape[:-1], dtype=np.int64)) * (pl.shape[-1] // per_block * nbytes)
        writer.add_tensor_info(pl.gguf_name, pl.shape, np.dtype(np.float32), size,
                               raw_dtype=gguf.GGMLQuantizationType(ggml_type))
    # "0.8B", "8x32M": the converter's label, counted from the tensor directory
    writer.add_size_label(gguf.size_label(*writer.get_total_parameter_count()))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    with torch.no_grad():
        for pl, ggml_type in zip(plan, types):
            writer.write_tensor_data(_gguf_tensor(pl, pl.view(params[pl.param].detach()), ggml_type))
    writer.close()
    return out
