"""Tests run single-threaded: their tensors are tiny, and on a loaded 2-core machine OpenMP threads that
spin-wait for each other make small ops up to 30x slower than one thread."""

import pytest
import torch

from qwen35 import kernels

torch.set_num_threads(1)


@pytest.fixture(params=["emulated", "native"])
def cpu_kind(request, monkeypatch):
    """Run a test under both bf16 dispatch plans (``QWEN35_CPU_BF16``), whatever this machine is."""
    from qwen35.kernels import ops

    monkeypatch.setenv(ops.CPU_BF16_SWITCH, request.param)
    kernels.reset()
    assert ops.cpu_kind() == request.param
    yield request.param
    monkeypatch.delenv(ops.CPU_BF16_SWITCH)
    kernels.reset()


@pytest.fixture(params=kernels.runnable_isas() or ["none"])
def native_kernels(request, monkeypatch):
    """The native library of every instruction-set variant this host can execute (native, avx512bf16, avx512,
    avx2, scalar as the CPU allows): a test taking this fixture runs once per variant.  Off x86-64 there are no native kernels
    (PyTorch serves every op), so there is nothing to run."""
    if request.param == "none":
        pytest.skip("native kernels are written for x86-64")
    monkeypatch.delenv(kernels.ENV_SWITCH, raising=False)
    monkeypatch.setenv(kernels.ISA_SWITCH, request.param)
    kernels.reset()
    k = kernels.native()
    assert k is not None, "an x86-64 machine with a C compiler must build the native kernels"
    if request.param != "native":
        assert k.isa == request.param, f"asked for the {request.param} variant, loaded {k.isa}"
    yield k
    kernels.reset()


@pytest.fixture
def float_products(monkeypatch):
    """int4 / int8 weight products in float32 at every row count (``q8_activations`` off on both CPU kinds), for
    the checks that are about a weight format itself: the quantized model against its dequantized twin.  By
    default the products round activations to int8 (see qwen35/kernels/ops.py: Limits.q8_activations)."""
    import dataclasses

    from qwen35.kernels import ops

    for kind, lim in list(ops.LIMITS.items()):
        monkeypatch.setitem(ops.LIMITS, kind, dataclasses.replace(lim, q8_activations=False))
