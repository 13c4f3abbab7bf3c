"""Native CPU kernels, compiled at first use with the host C compiler and called through ctypes.

Only what PyTorch lacks on common CPUs lives here: a bf16-weight × float32-activation product for the few-row
matmuls of decoding (gemm_bf16.c) and an in-place decode step of the gated delta rule on the slot pool
(gated_delta_step.c), sharing bf16.h; each source says why it exists.  The library is built once per source version and CPU into the
cache folder (``$QWEN35_CACHE`` or ``~/.cache/qwen35``), then loaded.  Without a compiler, on a CPU it does not
fit, or with ``QWEN35_NATIVE_KERNELS=0``, :func:`native` returns ``None`` and callers use PyTorch; nothing
requires the kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(n) for n in ("gemm_bf16.c", "gated_delta_step.c")]
HEADERS = [Path(__file__).with_name("bf16.h")]
ENV_SWITCH = "QWEN35_NATIVE_KERNELS"


class NativeKernels:
    """The loaded library with typed entry points."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.path = path
        lib.q35_isa.restype = ctypes.c_char_p
        lib.q35_isa.argtypes = []
        self.isa = lib.q35_isa().decode()
        f = lib.q35_linear_bf16
        f.restype = ctypes.c_int
        f.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                      ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
        self._linear_bf16 = f
        d = lib.q35_deltanet_decode
        d.restype = ctypes.c_int
        d.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p] + \
            [ctypes.c_int64] * 5 + [ctypes.c_void_p] * 3 + [ctypes.c_int]
        self._deltanet_decode = d

    def linear_bf16(self, x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype = torch.float32
                    ) -> torch.Tensor:
        """``x @ weight.T`` for a bf16 ``weight`` [N, K] and a float ``x`` [..., K], accumulated in float32 and
        returned as ``out_dtype`` (float32, or bf16 rounded to nearest even)."""
        if weight.dtype != torch.bfloat16 or weight.dim() != 2 or not weight.is_contiguous():
            raise ValueError(f"linear_bf16 needs a contiguous 2-D bf16 weight, got {weight.dtype} "
                             f"{tuple(weight.shape)} (contiguous={weight.is_contiguous()})")
        N, K = weight.shape
        if x.shape[-1] != K:
            raise ValueError(f"linear_bf16: activation has {x.shape[-1]} features, weight expects {K}")
        if out_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"linear_bf16 writes float32 or bfloat16, not {out_dtype}")
        x2 = x.reshape(-1, K)
        if x2.dtype not in (torch.float32, torch.bfloat16):
            x2 = x2.float()
        x2 = x2.contiguous()
        M = x2.shape[0]
        y = torch.empty(M, N, dtype=out_dtype)
        if M:
            rc = self._linear_bf16(x2.data_ptr(), int(x2.dtype == torch.bfloat16), K, weight.data_ptr(),
                                   y.data_ptr(), int(out_dtype == torch.bfloat16), N, M, N, K,
                                   torch.get_num_threads())
            if rc != 0:
                raise RuntimeError(f"q35_linear_bf16 failed ({rc}) for M={M} N={N} K={K}")
        return y.reshape(*x.shape[:-1], N)


    def deltanet_decode_(self, qkv: torch.Tensor, conv_weight: torch.Tensor, windows: torch.Tensor,
                         states: torch.Tensor, slots: torch.Tensor, n_k: int, g: torch.Tensor, beta: torch.Tensor
                         ) -> torch.Tensor:
        """Conv (+ window update), L2 norms and the gated delta step of one decode token for n sequences, in
        place on rows ``slots`` of the pools.  qkv [n, C]; conv_weight [C, 1, Kc]; windows [P, C, Kc-1] — all
        three float32 or all bf16; states [P, Hv, dk, dv] float32; g, beta [n, Hv].  Returns o [n, Hv, dv]
        float32."""
        P, Hv, dk, dv = states.shape
        n, C = qkv.shape
        Kc = conv_weight.shape[-1]
        dtypes = {qkv.dtype, conv_weight.dtype, windows.dtype}
        if len(dtypes) != 1 or qkv.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"deltanet_decode_: qkv, conv weight and windows must share float32 or bf16, got "
                             f"{sorted(map(str, dtypes))}")
        if states.dtype != torch.float32 or not (states.is_contiguous() and windows.is_contiguous()):
            raise ValueError("deltanet_decode_ needs contiguous pools and float32 states")
        if C != 2 * n_k * dk + Hv * dv or windows.shape != (P, C, Kc - 1) or conv_weight.numel() != C * Kc \
                or g.shape != (n, Hv) or beta.shape != (n, Hv) or slots.shape != (n,) or not 1 <= Kc <= 16:
            raise ValueError(f"deltanet_decode_: inconsistent shapes qkv {tuple(qkv.shape)} conv "
                             f"{tuple(conv_weight.shape)} windows {tuple(windows.shape)} states "
                             f"{tuple(states.shape)} g {tuple(g.shape)} beta {tuple(beta.shape)} slots "
                             f"{tuple(slots.shape)} with {n_k} key heads")
        slots = slots.to(torch.int64).contiguous()
        if n and (int(slots.min()) < 0 or int(slots.max()) >= P):
            raise ValueError(f"deltanet_decode_: slot index out of range 0..{P - 1}")
        qkv, conv_weight = qkv.contiguous(), conv_weight.contiguous()
        g, beta = g.to(torch.float32).contiguous(), beta.to(torch.float32).contiguous()
        out = torch.empty(n, Hv, dv, dtype=torch.float32)
        if n:
            rc = self._deltanet_decode(qkv.data_ptr(), conv_weight.data_ptr(), windows.data_ptr(),
                                       int(qkv.dtype == torch.bfloat16), Kc, states.data_ptr(), slots.data_ptr(),
                                       n, n_k, Hv, dk, dv, g.data_ptr(), beta.data_ptr(), out.data_ptr(),
                                       torch.get_num_threads())
            if rc != 0:
                raise RuntimeError(f"q35_deltanet_decode failed ({rc})")
        return out


_lock = threading.Lock()
_loaded: NativeKernels | None = None
_tried = False


def cache_dir() -> Path:
    root = os.environ.get("QWEN35_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "qwen35"


def _cpu_signature() -> str:
    # -march=native output depends on the CPU: key the build on its model and flags
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = next((ln for ln in info.splitlines() if ln.startswith("model name")), "")
        flags = next((ln for ln in info.splitlines() if ln.startswith("flags")), "")
        return model + flags
    except OSError:
        return platform.processor() + platform.machine()


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def build(force: bool = False) -> Path:
    """Compile the library into the cache folder (atomically) and return its path; raises on failure."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
    key = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES + HEADERS) + " ".join([cc, *flags]).encode()
                         + _cpu_signature().encode())
    name = f"qwen35_kernels_{key.hexdigest()[:16]}.so"
    out = cache_dir() / "kernels" / name
    if out.exists() and not force:
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(out.parent, os.W_OK):
            raise PermissionError(out.parent)
    except OSError:  # a read-only home: build where this user can write
        out = Path(tempfile.gettempdir()) / f"qwen35-{os.getuid()}" / "kernels" / name
        if out.exists() and not force:
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = Path(tmp) / out.name
        proc = subprocess.run([cc, *flags, *map(str, SOURCES), "-o", str(tmp_out), "-lm"], capture_output=True, check=False,
                              text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed to build the native kernels:\n{proc.stderr.strip()[-2000:]}")
        os.replace(tmp_out, out)  # other processes see either no library or a whole one
    return out


def native() -> NativeKernels | None:
    """The kernels, built and loaded on first call; ``None`` where they are off or cannot be built."""
    global _loaded, _tried
    if _tried:
        return _loaded
    with _lock:
        if _tried:
            return _loaded
        if os.environ.get(ENV_SWITCH, "1") in ("0", "false", "off", "no"):
            log.info("native kernels disabled by %s", ENV_SWITCH)
        elif platform.machine() not in ("x86_64", "AMD64"):
            log.info("native kernels are written for x86-64; using PyTorch on %s", platform.machine())
        else:
            try:
                path = build()
                _loaded = NativeKernels(ctypes.CDLL(str(path)), path)
            except (RuntimeError, OSError) as e:
                log.warning("native kernels unavailable, using PyTorch: %s", e)
        _tried = True
        return _loaded


def reset() -> None:
    """Forget the loaded state so the next :func:`native` call looks again (tests flip the switch)."""
    global _loaded, _tried
    with _lock:
        _loaded, _tried = None, False


__all__ = ["ENV_SWITCH", "NativeKernels", "build", "cache_dir", "native", "reset"]
