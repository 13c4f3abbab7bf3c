from __future__ import annotations

import pytest

from qwen35 import kernels


@pytest.fixture
def native_kernels(monkeypatch):
    monkeypatch.delenv(kernels.ENV_SWITCH, raising=False)
    kernels.reset()
    k = kernels.native()
    assert k is not None, "an x86-64 machine with a C compiler must build the native kernels"
    yield k
    kernels.reset()
