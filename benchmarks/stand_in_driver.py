"""A Triton driver that compiles for sm_90 on a machine without a GPU and does not run launches.

Installed as Triton's active driver, it makes Triton compile kernels for real (frontend, optimizer,
the bundled ptxas) and hand each launch to ``on_launch`` instead of a GPU. Used to time the host's
share of the pack path (benchmarks/host_stand_in.py) and to check what direct launches pass
(tests/kernels/direct_launch_check.py).
"""

from __future__ import annotations

from typing import Callable

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver


class _Utils:
    def load_binary(self, name, kernel, shared, device):
        return (1, 2, 32, 0, 1024)  # module, function, registers, spills, max threads

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}


class StandInDriver:
    """Targets sm_90; a launch calls ``on_launch(kernel_hash, *launch_args)`` (None: does nothing)."""

    utils = _Utils()

    def __init__(self, on_launch: Callable | None = None, stream: int = 0) -> None:
        self.on_launch = on_launch
        self.stream = stream

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return self.stream

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def map_python_to_cpp_type(self, ty):
        return ty

    def launcher_cls(self, src, metadata):
        on_launch = self.on_launch
        if on_launch is None:
            return lambda *args: None
        return lambda *args: on_launch(metadata.hash, *args)


def install(on_launch: Callable | None = None, stream: int = 0) -> StandInDriver:
    """Make a StandInDriver Triton's active driver (before any kernel is launched) and return it."""
    stand_in = StandInDriver(on_launch, stream)
    driver.set_active(stand_in)
    return stand_in


def install_for_cpu_tensors() -> StandInDriver:
    """``install()`` for a script that packs CPU tensors through the Triton launchers, whose launches then
    return at once; exits with status 2 (and a SKIP line) where this Triton's driver API differs.

    backend="triton" accepts CPU tensors only under the interpreter, so tritonquant's codec is told it
    runs under one. (Import this module after TRITON_INTERPRET is unset: Triton reads it once.)
    """
    import sys

    try:
        stand_in = install()
    except Exception as exc:  # noqa: BLE001 - a Triton whose driver API differs
        print(f"SKIP: cannot install a stand-in driver: {exc}")
        sys.exit(2)
    from tritonquant import codec

    prepare_codec(codec)
    return stand_in


def prepare_codec(codec) -> None:
    """Make a tritonquant ``codec`` module pack CPU tensors through the launchers under the stand-in.

    Its backend check is told it runs under the interpreter. And since no launch runs, the max-pooling
    indices it decodes would be whatever memory held, which backward's scatter would write through out
    of bounds: they are set to 0 after the launch, a position in every plane. (Other restored tensors
    keep whatever memory held: wrong values, but nothing indexes with them.)
    """
    codec.is_interpreted = lambda: True
    decode_pool = getattr(codec, "_DECODE_POOL", None)  # (a revision before the pool-index kernels has none)
    if decode_pool is not None:
        launch = decode_pool["triton"]

        def decode_to_zeros(codes, windows, out, _launch=launch):
            _launch(codes, windows, out)
            out.zero_()

        decode_pool["triton"] = decode_to_zeros
