"""Quantized checkpoints on disk: how each weight format is written, recognised and read back.

Why: a machine that cannot hold the bf16 weights must be able to load quantized ones directly.  A quantized folder
is an ordinary checkpoint folder (config.json + safetensors, official tensor names) in which every converted
Linear weight ``{module}.weight`` is stored in the format's dtype next to the format's extra tensors
``{module}.weight{ending}``, routed experts are stored per expert (``...mlp.experts.E.{gate,up,down}_proj``, as
the official FP8 release does), and config.json carries the format's ``quantization_config``.  Everything else
(embeddings, norms, kept projections, the vision tower) is stored as in a bf16 folder.

``qwen35.checkpoint.load_model`` reads such a folder straight into the quantized modules, tensor by tensor (no
float copy of a converted weight is ever made), and can also quantize a float folder while loading it; its
``save_pretrained`` writes a quantized model through :func:`quantized_checkpoint`.  ``qwen35 quantize IN OUT``
is the two in a row, so its peak memory is the quantized model plus one shard being written.

Formats (the value of ``--quantization`` / ``model.quantization``):

* ``fp8`` — the official Qwen3.5-*-FP8 layout, so transformers and vLLM read what qwen35 writes: ``weight``
  float8_e4m3fn + ``weight_scale_inv`` float32 [ceil(N/128), ceil(K/128)]; config
  ``{"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
  "modules_to_not_convert": [...]}`` (full module names in the folder's naming, as the official configs list them).
* ``int8`` — ours, in compressed-tensors' naming ("int-quantized" format: 8-bit symmetric, one scale per output
  channel): ``weight`` int8 [N, K] + ``weight_scale`` float32 [N, 1]; config ``{"quant_method":
  "compressed-tensors", "format": "int-quantized", "quantization_status": "compressed", "config_groups":
  {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "int", "symmetric": true, "strategy":
  "channel", "dynamic": false}, "input_activations": null, "output_activations": null}}, "ignore": [...]}``.
  qwen35 reads it; other engines' compressed-tensors W8A16 loaders are not tested against it.
* ``int4`` — ours (qwen35/quant/int4.py: symmetric, one bf16 scale per group of G consecutive inputs), read by
  qwen35 only (the nibble order is its kernel's, not compressed-tensors' pack-quantized or GPTQ's, hence a
  quant_method of its own).  A converted Linear ``X`` [N, K] is stored as
  ``X.weight`` uint8 [N, Kp/2] (two 4-bit values per byte in the block-of-64 order of ``pack_nibbles``; Kp = K
  rounded up to a multiple of max(G, 64), the padding weights 0), ``X.weight_scale`` bfloat16 [N, Kp/G] and
  ``X.weight_shape`` int64 [2] = [N, K] (K is not recoverable from the packed rows when K was padded);
  routed experts the same per expert and part.  The lm_head as quantize_int4's ``lm_head`` chose: "int8" (the
  default) as in the int8 format (``weight`` int8 [V, H] + ``weight_scale`` float32 [V, 1], no weight_shape),
  "int4" like any converted layer, None (null) unconverted in the model's dtype; with tied embeddings the
  quantized head is not stored but re-derived from the embedding at load (deterministically, so equal).
  Config ``{"quant_method": "qwen35-int4", "bits": 4, "group_size": G, "symmetric": true, "scale_dtype":
  "bfloat16", "packing": "qwen35-block64", "lm_head": "int8" | "int4" | null, "modules_to_not_convert":
  [...]}``; a reader refuses any other bits / symmetric / scale_dtype / packing, a bad group_size, or a missing
  lm_head key.  Converted: every Linear of the text model and MTP block except ``qwen35.quant.int8.KEEP``
  (DeltaNet in_proj_a/b, the router, shared_expert_gate, mtp.fc) and the embedding; the vision tower is not.

The formats are classes with the members of :class:`SavedFormat`, listed in :data:`FORMATS` (another one is added
with :func:`register` and a factory).  What a format must provide, exactly:

* ``name`` (str, e.g. "int4") and ``endings`` (the suffixes its extra tensors append to ``...weight``, e.g.
  ``("_scale", "_zero_point")``); the loader groups ``X.weight`` with every ``X.weight{ending}`` present and passes
  them as one dict keyed ``"weight"``, ``"weight_scale"``, ... — the packed values must be stored under
  ``X.weight`` itself (any dtype, any shape: the format checks it);
* ``quantization_config(not_converted)`` -> the dict for config.json, and ``wrote(quantization_config)`` -> bool,
  True for exactly the configs it writes (the registry asks each factory in turn);
* ``converts(module_name)`` -> bool: the recipe (which Linear layers / expert banks it quantizes; our module
  names: ``model.layers.N.…``, ``mtp.…``, ``lm_head``, ``visual.…``); ``lm_head`` must be one of them for
  a tied head to be quantized (it is then re-derived from the embedding at load);
* ``quantize(w, module_name)`` -> its on-disk tensors of one float [N, K] weight of that module (an expert bank's
  module name for an expert's part); ``dequantize(tensors)`` -> float32 [N, K];
  ``check(tensors, shape, what)`` raises ValueError naming ``what`` when the tensors do not encode a ``shape``
  weight (wrong dtype, missing or mis-shaped scales);
* ``linear(tensors)`` -> a module holding *copies* of them (the loader gives the file's pages back after);
  ``linear_tensors(module)`` -> its on-disk tensors; ``linear_type`` (the class, or a tuple of classes, to find
  them in a model);
* ``new_experts(n_experts, hidden, intermediate)`` -> an empty expert bank (drop-in for ``Experts``, with
  ``n_experts`` / ``intermediate`` attributes); ``set_expert(bank, e, part, tensors)`` with part in gate_proj /
  up_proj / down_proj; ``expert_tensors(bank, e, part)``; ``experts_type``;
* ``quantize_model(model)`` -> the in-memory recipe (sets ``model.quantization = name``), whose result a
  save-and-load round trip must reproduce exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from .fp8 import (
    BLOCK,
    Fp8Experts,
    Fp8Linear,
    check_fp8_pair,
    fp8_converts,
    quantize_block_fp8,
    quantize_fp8,
)
from .int4 import (
    DEFAULT_GROUP_SIZE,
    HEAD_FORMATS,
    Int4Experts,
    Int4Linear,
    check_group_size,
    check_packed,
    dequantize_groups,
    quantize_groups,
    quantize_int4,
)
from .int8 import KEEP as INT8_KEEP
from .int8 import Int8Experts, Int8Linear, quantize_int8, quantize_rows

EXPERT_PARTS = ("gate_proj", "up_proj", "down_proj")
Tensors = dict[str, torch.Tensor]


class SavedFormat(Protocol):
    """What a weight format provides to be saved and loaded (see the module docstring)."""

    name: str
    endings: tuple[str, ...]
    linear_type: type | tuple[type, ...]
    experts_type: type

    def quantization_config(self, not_converted: list[str]) -> dict[str, Any]: ...
    def wrote(self, quantization_config: dict[str, Any]) -> bool: ...
    def converts(self, module_name: str) -> bool: ...
    def quantize(self, w: torch.Tensor, module_name: str) -> Tensors: ...
    def dequantize(self, tensors: Tensors) -> torch.Tensor: ...
    def check(self, tensors: Tensors, shape: tuple[int, int], what: str) -> None: ...
    def linear(self, tensors: Tensors) -> nn.Module: ...
    def linear_tensors(self, module: nn.Module) -> Tensors: ...
    def new_experts(self, n_experts: int, hidden: int, intermediate: int) -> nn.Module: ...
    def set_expert(self, bank: nn.Module, e: int, part: str, tensors: Tensors) -> None: ...
    def expert_tensors(self, bank: nn.Module, e: int, part: str) -> Tensors: ...
    def quantize_model(self, model: nn.Module) -> nn.Module: ...


# ---- fp8 --------------------------------------------------------------------------------------------------------

class Fp8Format:
    """The official block-FP8 layout (qwen35/quant/fp8.py)."""

    name = "fp8"
    endings = ("_scale_inv",)
    linear_type = Fp8Linear
    experts_type = Fp8Experts

    def __init__(self, quantization_config: dict[str, Any] | None = None) -> None:
        block = BLOCK
        if quantization_config is not None:
            fmt = quantization_config.get("fmt")
            if fmt not in (None, "e4m3"):
                raise ValueError(f"quantization_config.fmt {fmt!r} is not supported; qwen35 reads block-FP8 e4m3")
            b = quantization_config.get("weight_block_size")
            if not isinstance(b, (list, tuple)) or len(b) != 2 or not all(isinstance(v, int) and v > 0 for v in b):
                raise ValueError(f"quantization_config.weight_block_size must be [rows, cols] for FP8 checkpoints, "
                                 f"got {b!r}")
            block = (b[0], b[1])
        self.block = block

    def quantization_config(self, not_converted: list[str]) -> dict[str, Any]:
        return {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                "weight_block_size": list(self.block), "modules_to_not_convert": not_converted}

    def wrote(self, quantization_config: dict[str, Any]) -> bool:
        return quantization_config.get("quant_method") == "fp8"

    def converts(self, module_name: str) -> bool:
        return fp8_converts(module_name)

    def quantize(self, w: torch.Tensor, module_name: str) -> Tensors:
        q, s = quantize_block_fp8(w, self.block)
        return {"weight": q, "weight_scale_inv": s}

    def dequantize(self, tensors: Tensors) -> torch.Tensor:
        from ..kernels.ops import dequantize_fp8_blocks

        return dequantize_fp8_blocks(tensors["weight"], tensors["weight_scale_inv"], self.block)

    def check(self, tensors: Tensors, shape: tuple[int, int], what: str) -> None:
        if "weight_scale_inv" not in tensors:
            raise ValueError(f"{what}: FP8 weight without its weight_scale_inv")
        check_fp8_pair(tensors["weight"], tensors["weight_scale_inv"], self.block, what)
        if tuple(tensors["weight"].shape) != tuple(shape):
            raise ValueError(f"{what}: weight has shape {list(tensors['weight'].shape)}, expected {list(shape)}")

    def linear(self, tensors: Tensors) -> nn.Module:
        return Fp8Linear(tensors["weight"].clone(), tensors["weight_scale_inv"].float().clone(), None, self.block)

    def linear_tensors(self, module: nn.Module) -> Tensors:
        return {"weight": module.weight, "weight_scale_inv": module.weight_scale_inv}

    def new_experts(self, n_experts: int, hidden: int, intermediate: int) -> nn.Module:
        return Fp8Experts(n_experts, hidden, intermediate, self.block)

    def set_expert(self, bank: nn.Module, e: int, part: str, tensors: Tensors) -> None:
        bank.set_expert(e, part, tensors["weight"], tensors["weight_scale_inv"].float())

    def expert_tensors(self, bank: nn.Module, e: int, part: str) -> Tensors:
        w, s = bank.expert(e, part)
        return {"weight": w, "weight_scale_inv": s}

    def quantize_model(self, model: nn.Module) -> nn.Module:
        return quantize_fp8(model, self.block)


# ---- int8 -------------------------------------------------------------------------------------------------------

_ROWS_CHUNK_ELEMENTS = 1 << 19  # weights quantized at a time: bounds the float32 temporaries (a 248K-row lm_head)


def _int8_tensors(w: torch.Tensor) -> Tensors:
    """``quantize_rows`` of a [N, K] weight slab by slab of rows (each row on its own, so equal to one call):
    weight int8 [N, K] and weight_scale float32 [N, 1]."""
    q = torch.empty(w.shape, dtype=torch.int8)
    s = torch.empty(w.shape[0], dtype=torch.float32)
    step = max(1, _ROWS_CHUNK_ELEMENTS // max(1, w.shape[-1]))
    for r in range(0, w.shape[0], step):
        q[r:r + step], s[r:r + step] = quantize_rows(w[r:r + step])
    return {"weight": q, "weight_scale": s[:, None]}


_INT8_GROUP = {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "int", "symmetric": True,
                                                  "strategy": "channel", "dynamic": False},
               "input_activations": None, "output_activations": None}


class Int8Format:
    """Weight-only int8 with one scale per output row (qwen35/quant/int8.py), in compressed-tensors' naming."""

    name = "int8"
    endings = ("_scale",)
    linear_type = Int8Linear
    experts_type = Int8Experts

    def __init__(self, quantization_config: dict[str, Any] | None = None) -> None:
        pass

    def quantization_config(self, not_converted: list[str]) -> dict[str, Any]:
        return {"quant_method": "compressed-tensors", "format": "int-quantized", "quantization_status": "compressed",
                "config_groups": {"group_0": _INT8_GROUP}, "ignore": not_converted}

    def wrote(self, quantization_config: dict[str, Any]) -> bool:
        if quantization_config.get("quant_method") != "compressed-tensors":
            return False
        groups = quantization_config.get("config_groups") or {}
        weights = [g.get("weights") or {} for g in groups.values() if isinstance(g, dict)]
        return quantization_config.get("format") == "int-quantized" and len(weights) == 1 \
            and all(weights[0].get(k) == v for k, v in _INT8_GROUP["weights"].items() if k != "dynamic") \
            and not (groups and next(iter(groups.values())).get("input_activations"))

    def converts(self, module_name: str) -> bool:
        return not module_name.startswith("visual") and not module_name.endswith(INT8_KEEP) \
            and module_name != "model.embed_tokens"

    def quantize(self, w: torch.Tensor, module_name: str) -> Tensors:
        return _int8_tensors(w)

    def dequantize(self, tensors: Tensors) -> torch.Tensor:
        return tensors["weight"].float() * tensors["weight_scale"].float().reshape(-1, 1)

    def check(self, tensors: Tensors, shape: tuple[int, int], what: str) -> None:
        w, s = tensors["weight"], tensors.get("weight_scale")
        if s is None:
            raise ValueError(f"{what}: int8 weight without its weight_scale")
        if w.dtype != torch.int8 or tuple(w.shape) != tuple(shape):
            raise ValueError(f"{what}: an int8 weight must be int8 {list(shape)}, got {w.dtype} {list(w.shape)}")
        if s.numel() != shape[0] or not s.is_floating_point() or s.dim() not in (1, 2):
            raise ValueError(f"{what}: weight_scale must hold one float per output row ({shape[0]}), got "
                             f"{s.dtype} {list(s.shape)}")

    @staticmethod
    def _buffers(owner: nn.Module, prefix: str, q: torch.Tensor, scale: torch.Tensor) -> None:
        owner.register_buffer(f"{prefix}q" if prefix else "qweight", q)
        owner.register_buffer(f"{prefix}scale", scale)
        owner.register_buffer(f"{prefix}scale_bf16", scale.to(torch.bfloat16))

    def linear(self, tensors: Tensors) -> nn.Module:
        # built around Int8Linear's buffers (qweight, scale, scale_bf16) without re-quantizing a float weight
        m = Int8Linear.__new__(Int8Linear)
        nn.Module.__init__(m)
        self._buffers(m, "", tensors["weight"].clone(), tensors["weight_scale"].float().reshape(-1).clone())
        m.bias = None
        m.out_features, m.in_features = tensors["weight"].shape
        return m

    def linear_tensors(self, module: nn.Module) -> Tensors:
        return {"weight": module.qweight, "weight_scale": module.scale.float()[:, None]}

    def new_experts(self, n_experts: int, hidden: int, intermediate: int) -> nn.Module:
        m = Int8Experts.__new__(Int8Experts)
        nn.Module.__init__(m)
        m.n_experts, m.intermediate = n_experts, intermediate
        for name, rows, cols in (("gate_up_proj", 2 * intermediate, hidden), ("down_proj", hidden, intermediate)):
            m.register_buffer(f"{name}_q", torch.empty(n_experts, rows, cols, dtype=torch.int8))
            m.register_buffer(f"{name}_scale", torch.empty(n_experts, rows, dtype=torch.float32))
            m.register_buffer(f"{name}_scale_bf16", torch.empty(n_experts, rows, dtype=torch.bfloat16))
        return m

    def _rows(self, bank: nn.Module, part: str) -> tuple[str, slice]:
        inter = bank.intermediate
        return ("down_proj", slice(None)) if part == "down_proj" else \
            ("gate_up_proj", slice(0, inter) if part == "gate_proj" else slice(inter, 2 * inter))

    def set_expert(self, bank: nn.Module, e: int, part: str, tensors: Tensors) -> None:
        name, rows = self._rows(bank, part)
        scale = tensors["weight_scale"].float().reshape(-1)
        getattr(bank, f"{name}_q")[e, rows].copy_(tensors["weight"])
        getattr(bank, f"{name}_scale")[e, rows].copy_(scale)
        getattr(bank, f"{name}_scale_bf16")[e, rows].copy_(scale.to(torch.bfloat16))

    def expert_tensors(self, bank: nn.Module, e: int, part: str) -> Tensors:
        name, rows = self._rows(bank, part)
        return {"weight": getattr(bank, f"{name}_q")[e, rows].contiguous(),
                "weight_scale": getattr(bank, f"{name}_scale")[e, rows].float()[:, None].contiguous()}

    def quantize_model(self, model: nn.Module) -> nn.Module:
        return quantize_int8(model)


# ---- int4 -------------------------------------------------------------------------------------------------------

INT4_METHOD = "qwen35-int4"  # ours: no other engine reads this packing, so the name is not another tool's
INT4_PACKING = "qwen35-block64"  # the nibble order of qwen35.quant.int4.pack_nibbles (what int4.c unpacks)


def _expert_rows(bank: nn.Module, part: str) -> tuple[str, slice]:
    """The fused buffer of an expert bank holding ``part`` and its rows there (gate rows first in gate_up)."""
    inter = bank.intermediate
    return ("down_proj", slice(None)) if part == "down_proj" else \
        ("gate_up_proj", slice(0, inter) if part == "gate_proj" else slice(inter, 2 * inter))


def _shape_tensor(rows: int, cols: int) -> torch.Tensor:
    return torch.tensor([rows, cols], dtype=torch.int64)


class Int4Format:
    """4-bit group-wise weights (qwen35/quant/int4.py) with the lm_head as the recipe stores it: int8 (the
    default), int4, or kept in the model's dtype (``lm_head`` None).  ``group_size`` / ``lm_head`` are
    quantize_int4's arguments; a folder records both in its quantization_config, so they round-trip."""

    name = "int4"
    endings = ("_scale", "_shape")
    linear_type = (Int4Linear, Int8Linear)  # the int8 one: the lm_head
    experts_type = Int4Experts

    def __init__(self, quantization_config: dict[str, Any] | None = None, *, group_size: int = DEFAULT_GROUP_SIZE,
                 lm_head: str | None = "int8") -> None:
        if quantization_config is not None:
            q = quantization_config
            fixed = {"bits": 4, "symmetric": True, "scale_dtype": "bfloat16", "packing": INT4_PACKING}
            wrong = {k: q.get(k) for k, v in fixed.items() if q.get(k) != v}
            if wrong:
                raise ValueError(f"quantization_config of a {INT4_METHOD} folder has {wrong}; qwen35 reads "
                                 f"{fixed}")
            if "lm_head" not in q:
                raise ValueError(f"quantization_config of a {INT4_METHOD} folder lacks 'lm_head' (one of "
                                 f"{', '.join(map(repr, HEAD_FORMATS))})")
            group_size, lm_head = q.get("group_size"), q["lm_head"]
        try:
            self.group_size = check_group_size(group_size)
        except ValueError as e:
            raise ValueError(f"int4 group_size: {e}") from None
        if lm_head not in HEAD_FORMATS:
            raise ValueError(f"int4 lm_head must be one of {', '.join(map(repr, HEAD_FORMATS))}, got {lm_head!r}")
        self.lm_head = lm_head

    @classmethod
    def of_model(cls, model: nn.Module) -> Int4Format:
        """The format of a model quantize_int4 converted: its modules' group size and its lm_head's type."""
        groups = {m.group_size for m in model.modules() if isinstance(m, (Int4Linear, Int4Experts))}
        if len(groups) > 1:
            raise ValueError(f"the model's int4 modules use several group sizes {sorted(groups)}; a checkpoint has "
                             "one group_size")
        head = getattr(model, "lm_head", None)
        lm_head = "int8" if isinstance(head, Int8Linear) else "int4" if isinstance(head, Int4Linear) else None
        return cls(group_size=groups.pop() if groups else DEFAULT_GROUP_SIZE, lm_head=lm_head)

    def quantization_config(self, not_converted: list[str]) -> dict[str, Any]:
        return {"quant_method": INT4_METHOD, "bits": 4, "group_size": self.group_size, "symmetric": True,
                "scale_dtype": "bfloat16", "packing": INT4_PACKING, "lm_head": self.lm_head,
                "modules_to_not_convert": not_converted}

    def wrote(self, quantization_config: dict[str, Any]) -> bool:
        return quantization_config.get("quant_method") == INT4_METHOD

    def converts(self, module_name: str) -> bool:  # quantize_int4's recipe
        if module_name == "lm_head":
            return self.lm_head is not None
        return not module_name.startswith("visual") and not module_name.endswith(INT8_KEEP) \
            and module_name != "model.embed_tokens"

    def quantize(self, w: torch.Tensor, module_name: str) -> Tensors:
        if module_name == "lm_head" and self.lm_head == "int8":
            return _int8_tensors(w)
        q, s = quantize_groups(w, self.group_size)
        return {"weight": q, "weight_scale": s, "weight_shape": _shape_tensor(*w.shape)}

    def dequantize(self, tensors: Tensors) -> torch.Tensor:
        w = tensors["weight"]
        if w.dtype == torch.int8:
            return Int8Format().dequantize(tensors)
        in_features = int(tensors["weight_shape"][1])
        return dequantize_groups(w, tensors["weight_scale"].to(torch.bfloat16), in_features, self.group_size)

    def check(self, tensors: Tensors, shape: tuple[int, int], what: str) -> None:
        w = tensors["weight"]
        if w.dtype == torch.int8:  # an int8 layer (the lm_head): one float scale per row
            if "weight_shape" in tensors:
                raise ValueError(f"{what}: an int8 weight with a weight_shape; in an int4 folder only 4-bit "
                                 "(uint8) weights carry one")
            Int8Format().check(tensors, shape, what)
            return
        sh, s = tensors.get("weight_shape"), tensors.get("weight_scale")
        if s is None or sh is None:
            raise ValueError(f"{what}: 4-bit weight without its {'weight_scale' if s is None else 'weight_shape'}")
        if sh.dtype not in (torch.int32, torch.int64) or sh.numel() != 2:
            raise ValueError(f"{what}: weight_shape must hold two integers [rows, inputs], got {sh.dtype} "
                             f"{list(sh.shape)}")
        if tuple(sh.tolist()) != tuple(shape):
            raise ValueError(f"{what}: weight_shape is {sh.tolist()}, expected {list(shape)} from config.json")
        check_packed(w, s, shape[1], self.group_size, what)

    def linear(self, tensors: Tensors) -> nn.Module:
        if tensors["weight"].dtype == torch.int8:
            return Int8Format().linear(tensors)
        in_features = int(tensors["weight_shape"][1])
        return Int4Linear.packed(tensors["weight"].clone(), tensors["weight_scale"].to(torch.bfloat16).clone(),
                                 in_features, self.group_size)

    def linear_tensors(self, module: nn.Module) -> Tensors:
        if isinstance(module, Int8Linear):
            return Int8Format().linear_tensors(module)
        return {"weight": module.qweight, "weight_scale": module.scales.to(torch.bfloat16),
                "weight_shape": _shape_tensor(module.out_features, module.in_features)}

    def new_experts(self, n_experts: int, hidden: int, intermediate: int) -> nn.Module:
        return Int4Experts.empty(n_experts, hidden, intermediate, self.group_size)

    def set_expert(self, bank: nn.Module, e: int, part: str, tensors: Tensors) -> None:
        name, rows = _expert_rows(bank, part)
        if tensors["weight"].dtype != torch.uint8:
            raise ValueError(f"int4 expert banks hold 4-bit (uint8) weights; {part} of expert {e} is "
                             f"{tensors['weight'].dtype}")
        getattr(bank, f"{name}_q")[e, rows].copy_(tensors["weight"])
        getattr(bank, f"{name}_scales")[e, rows].copy_(tensors["weight_scale"])

    def expert_tensors(self, bank: nn.Module, e: int, part: str) -> Tensors:
        name, rows = _expert_rows(bank, part)
        q = getattr(bank, f"{name}_q")[e, rows].contiguous()
        return {"weight": q, "weight_scale": getattr(bank, f"{name}_scales")[e, rows].to(torch.bfloat16).contiguous(),
                "weight_shape": _shape_tensor(q.shape[0], bank.in_features[name])}

    def quantize_model(self, model: nn.Module) -> nn.Module:
        return quantize_int4(model, self.group_size, lm_head=self.lm_head)


# ---- the registry -----------------------------------------------------------------------------------------------

FormatFactory = Callable[[dict[str, Any] | None], SavedFormat]
FORMATS: dict[str, FormatFactory] = {"fp8": Fp8Format, "int4": Int4Format, "int8": Int8Format}


def register(name: str, factory: FormatFactory) -> None:
    """Add a format: ``factory(None)`` gives it for quantizing, ``factory(quantization_config)`` for reading a
    folder it wrote (raising ValueError for a config it cannot read)."""
    FORMATS[name] = factory


def quantization_names() -> list[str]:
    return sorted(FORMATS)


def get_format(name: str) -> SavedFormat:
    """The format called ``name``, for quantizing; ValueError naming the known ones otherwise."""
    if name not in FORMATS:
        raise ValueError(f"quantization {name!r} is not one of {', '.join(quantization_names())}")
    return FORMATS[name](None)


def format_of_config(quantization_config: dict[str, Any]) -> SavedFormat | None:
    """The format that wrote a folder with this ``quantization_config`` (its reader), or None when none did."""
    for factory in FORMATS.values():
        probe = factory(None)
        if probe.wrote(quantization_config):
            return factory(quantization_config)
    return None


def format_of_model(model: nn.Module) -> SavedFormat | None:
    """The format of a quantized model (``model.quantization``), configured as its modules are (FP8 block)."""
    name = getattr(model, "quantization", None)
    if name is None:
        return None
    if name not in FORMATS:
        raise ValueError(f"model.quantization {name!r} is not a format qwen35 can save "
                         f"({', '.join(quantization_names())})")
    fmt = FORMATS[name](None)
    if isinstance(fmt, Fp8Format):
        blocks = {m.block for m in model.modules() if isinstance(m, (Fp8Linear, Fp8Experts))}
        if len(blocks) > 1:
            raise ValueError(f"the model's FP8 modules use several block sizes {sorted(blocks)}; a checkpoint "
                             "has one weight_block_size")
        if blocks:
            fmt.block = blocks.pop()
    elif isinstance(fmt, Int4Format):
        fmt = Int4Format.of_model(model)
    return fmt


# ---- saving -----------------------------------------------------------------------------------------------------

def quantized_checkpoint(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors (official names, quantized modules in their format's layout, experts per expert) and the
    ``quantization_config`` of a quantized model; the tensors are views of the model's own storage."""
    from ..model.moe import Experts

    fmt = format_of_model(model)
    if fmt is None:
        raise ValueError("quantized_checkpoint needs a quantized model (model.quantization is not set)")
    config = model.config
    prefix = "model.language_model." if config.multimodal else "model."

    def disk(name: str) -> str:
        if name.startswith("model."):
            return prefix + name[len("model."):]
        if name.startswith("visual."):
            return "model.visual." + name[len("visual."):]
        return name

    tied = config.text.tie_word_embeddings
    tensors: dict[str, torch.Tensor] = {}
    quantized: set[str] = set()
    not_converted: list[str] = []
    for mname, m in model.named_modules():
        if mname.startswith("visual") and config.vision is None:
            continue
        if tied and mname == "lm_head":
            continue  # the tied head is the embedding (re-derived from it at load)
        if isinstance(m, fmt.linear_type):
            quantized.add(mname)
            for suffix, t in fmt.linear_tensors(m).items():
                tensors[disk(f"{mname}.{suffix}")] = t.detach().contiguous()
        elif isinstance(m, fmt.experts_type):
            quantized.add(mname)
            for e in range(m.n_experts):
                for part in EXPERT_PARTS:
                    for suffix, t in fmt.expert_tensors(m, e, part).items():
                        tensors[disk(f"{mname}.{e}.{part}.{suffix}")] = t.detach().contiguous()
        elif isinstance(m, nn.Linear) and not mname.startswith("visual"):
            not_converted.append(disk(mname))
        elif isinstance(m, (Int8Linear, Int8Experts, Fp8Linear, Fp8Experts, Int4Linear, Int4Experts)):
            raise ValueError(f"{mname} is a {type(m).__name__} in a model quantized as {fmt.name}; one checkpoint "
                             "holds one format")
    params = dict(model.named_parameters(remove_duplicate=True))
    if tied:
        params.pop("lm_head.weight", None)
    for name, p in params.items():
        owner = name.rpartition(".")[0]
        if name.startswith("visual.") and config.vision is None:
            continue
        if owner in quantized and name.endswith(".bias"):
            raise ValueError(f"{owner}: quantized layers with a bias are not saved by qwen35")
        t = p.detach()
        if isinstance(model.get_submodule(owner), Experts) and name.startswith("mtp."):
            # float expert banks of the MTP block: per expert, as official checkpoints store them
            base = name.rpartition(".")[0]
            inter = model.get_submodule(owner).intermediate
            for e in range(t.shape[0]):
                if name.endswith("gate_up_proj"):
                    tensors[f"{base}.{e}.gate_proj.weight"] = t[e, :inter].contiguous()
                    tensors[f"{base}.{e}.up_proj.weight"] = t[e, inter:].contiguous()
                else:
                    tensors[f"{base}.{e}.down_proj.weight"] = t[e].contiguous()
            continue
        tensors[disk(name)] = t.contiguous()
    for name, t in getattr(model, "extra_tensors", {}).items():
        tensors[name] = t.contiguous()
    return tensors, fmt.quantization_config(sorted(not_converted))


# ---- loading ----------------------------------------------------------------------------------------------------

def resolve_load(stored: SavedFormat | None, quantization: str | SavedFormat | None, dtype_given: bool
                 ) -> tuple[SavedFormat | None, bool]:
    """(the format to load into or None for float, whether a stored quantized weight is kept as stored).

    ``quantization``: "auto" keeps a quantized folder quantized unless a dtype was asked for explicitly (which
    widens it, as before), and loads a float folder as float; None / "none" always loads float; a format name
    loads into that format (kept as stored when the folder already is, else quantized tensor by tensor).  A
    format object (e.g. ``Int4Format(group_size=64)``) asks for those settings: a folder is kept as stored only
    when it was written with the same quantization_config, else it is re-quantized from its float values."""
    if isinstance(quantization, str) and quantization == "auto":
        if stored is None or dtype_given:
            return None, False
        return stored, True
    if quantization is None or (isinstance(quantization, str) and quantization == "none"):
        return None, False
    if isinstance(quantization, str):
        target = get_format(quantization)
        if stored is not None and stored.name == target.name:
            return stored, True
        return target, False
    if stored is not None and stored.name == quantization.name \
            and stored.quantization_config([]) == quantization.quantization_config([]):
        return stored, True
    return quantization, False


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, attr, module)


__all__ = ["EXPERT_PARTS", "FORMATS", "INT4_METHOD", "INT4_PACKING", "Fp8Format", "Int4Format", "Int8Format",
           "SavedFormat", "format_of_config", "format_of_model", "get_format", "quantization_names",
           "quantized_checkpoint", "register", "resolve_load", "set_module"]
