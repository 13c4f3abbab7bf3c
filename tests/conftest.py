"""Tests run single-threaded: their tensors are tiny, and on a loaded 2-core machine OpenMP threads that
spin-wait for each other make small ops up to 30x slower than one thread."""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(params=["emulated", "native"])
def cpu_kind(request, monkeypatch):
    """Run a test under both bf16 dispatch plans (``QWEN35_CPU_BF16``), whatever this machine is."""
    from qwen35 import kernels
    from qwen35.kernels import ops

    monkeypatch.setenv(ops.CPU_BF16_SWITCH, request.param)
    kernels.reset()
    assert ops.cpu_kind() == request.param
    yield request.param
    monkeypatch.delenv(ops.CPU_BF16_SWITCH)
    kernels.reset()
