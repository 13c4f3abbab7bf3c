from __future__ import annotations

import pytest

from qwen35 import kernels

# every instruction-set variant of the native library this host can execute: each test that takes the
# `native_kernels` fixture runs once per variant (native, avx512, avx2, scalar as the CPU allows)
ISAS = kernels.runnable_isas()


@pytest.fixture(params=ISAS or ["none"])
def native_kernels(request, monkeypatch):
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
