"""Test setup: without a GPU, Triton kernels run on the CPU through the interpreter.

TRITON_INTERPRET must be set before triton is first imported, so this file sets it before anything
imports tritonquant. Tests that need CUDA carry the ``gpu`` marker and are skipped without one.
"""

import os
import sys

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

# Backends that can run here on the `device` fixture's tensors: Triton runs interpreted on CPU.
BACKENDS = ("torch", "triton")
# Backends that can pack CPU tensors here: Triton only through the interpreter, so only without a GPU.
# (Tests of CPU models compare the backends there; on a GPU, tests/kernels/test_gpu_exact.py does.)
CPU_BACKENDS = ("torch",) if HAS_CUDA else ("torch", "triton")
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _current_stream_restored():
    """On a GPU, each test ends on the stream it started on: a CUDA graph capture that fails leaves its
    side stream current (torch.cuda.graph ends the capture before it restores the stream), and every
    later test would run there."""
    stream = torch.cuda.current_stream() if HAS_CUDA else None
    yield
    if stream is not None and torch.cuda.current_stream() != stream:
        torch.cuda.set_stream(stream)


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """A private autotune cache folder and a clean in-process tuner state (for the tuning tests)."""
    from tritonquant.kernels import autotune

    monkeypatch.setenv(autotune.ENV_CACHE_DIR, str(tmp_path / "cache"))
    monkeypatch.delenv(autotune.ENV_AUTOTUNE, raising=False)
    autotune.reset()
    yield tmp_path / "cache"
    autotune.reset()
