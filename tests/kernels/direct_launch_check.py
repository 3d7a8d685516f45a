"""KernelLauncher's direct launches hand the launcher exactly what Triton's dispatch hands it (run as a script).

No GPU is needed: Triton's active driver is replaced by one that targets sm_90, compiles for real
(frontend, optimizer, bundled ptxas) and records each launch instead of performing it. Then, for the
quantize kernel and a series of argument sets that differ in what Triton specializes on (pointer
alignment, an int equal to 1, divisibility by 16, 64-bit ints, constexprs, num_warps), this checks:

  * the first launch of each specialization goes through Triton's dispatch, a repeat does not;
  * a direct launch passes the launcher the same values, in the same order, as the dispatch did
    for the same arguments (grid, stream, compiled function, metadata, every argument);
  * a direct launch never reuses a kernel compiled for another specialization;
  * an argument error is raised by the dispatch and leaves direct launches on;
  * with a launch hook installed, every launch goes through the dispatch;
  * ``triton_quantize`` and ``triton_dequantize``, called again and again with what a model's layers
    repeat (and with what they must not confuse: alignment, sizes, dtypes, bits, schemes, seeds,
    activations), end up launching from a plan (``KernelLauncher.launch_planned``), and every launch,
    planned or not, hands the launcher what Triton's dispatch does for the same call.

Prints one line per check and exits 1 on the first failure, 2 if this Triton's internals differ
from what the fake driver needs (then nothing about the launcher was checked).

    python tests/kernels/direct_launch_check.py
"""

import os
import sys
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # for stand_in_driver

try:
    from triton import knobs

    import stand_in_driver
except ImportError as exc:  # pragma: no cover - an older or newer Triton
    print(f"SKIP: {exc}")
    sys.exit(2)

LAUNCHES: list[tuple] = []

try:
    # Compiles for sm_90; each launch is recorded, with its kernel's compiled identity, and not run.
    stand_in_driver.install(on_launch=lambda *launch: LAUNCHES.append(launch), stream=1234)
except Exception as exc:  # noqa: BLE001
    print(f"SKIP: cannot install a fake driver: {exc}")
    sys.exit(2)

os.environ["TRITONQUANT_AUTOTUNE"] = "0"  # (the launchers' untuned tile: nothing runs to time candidates on)

from tritonquant import codec  # noqa: E402
from tritonquant.kernels import launch as launch_module  # noqa: E402
from tritonquant.kernels import autotune  # noqa: E402
from tritonquant.kernels.autotune import use_config  # noqa: E402
from tritonquant.kernels.channels import divider  # noqa: E402
from tritonquant.kernels.dequantize import _dequantize_kernel, _launch_dequantize, triton_dequantize  # noqa: E402
from tritonquant.kernels.launch import KernelLauncher  # noqa: E402
from tritonquant.kernels.quantize import (_launch_quantize, _quantize_kernel, quantize_launch_arguments,  # noqa: E402
                                          triton_quantize)
from tritonquant.traced import PACKED_DTYPES  # noqa: E402

stand_in_driver.prepare_codec(codec)  # (backend="triton" on CPU tensors, for the compiled graphs' ops)

DISPATCHES = []


def count_dispatches(kernel) -> None:
    dispatch = kernel.run

    def counting_dispatch(*args, **kwargs):
        DISPATCHES.append(1)
        return dispatch(*args, **kwargs)

    kernel.run = counting_dispatch


count_dispatches(_quantize_kernel)
count_dispatches(_dequantize_kernel)


def fail(message: str) -> None:
    print(f"FAILED: {message}")
    sys.exit(1)


def identical(a, b) -> bool:
    """The same object, or equal plain values (tensors only ever match themselves)."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    return type(a) is type(b) and a == b


def argument_sets():
    """(name, runtime args, constexprs, num_warps); every set differs from the first in one respect."""
    x = torch.zeros(4096 + 8, dtype=torch.bfloat16)
    payload = torch.zeros(4096, dtype=torch.uint8)
    meta = torch.zeros(64, 2)
    # What triton_quantize passes for 4096 bf16 elements (16 groups) at 4 rows x 4 warps.
    base, constexprs = quantize_launch_arguments(x[:4096], payload, meta[:16], bits=4, group_size=256, rows=4,
                                                 num_warps=4)

    def changed(index, value):
        return base[:index] + (value,) + base[index + 1:]

    yield "aligned, 16 groups", base, constexprs, 4
    yield "input pointer 2 bytes past 16-byte alignment", changed(0, x[1:]), constexprs, 4
    yield "n_groups = 1 (Triton makes the value 1 a constant)", changed(4, 1), constexprs, 4
    yield "n_groups = 17 (not a multiple of 16)", changed(4, 17), constexprs, 4
    yield "rng_offset beyond int32", changed(6, 2**40), constexprs, 4
    yield "a prepared channel divisor (a 64-bit int)", changed(8, divider(49)), constexprs, 4
    yield "fp32 input", changed(0, torch.zeros(4096)), constexprs, 4
    yield "another constexpr (BITS=2)", base, {**constexprs, "BITS": 2}, 4
    yield "another num_warps", base, constexprs, 8


def check_dispatch_then_direct(launcher, name, args, constexprs, num_warps, seen_hashes: dict) -> None:
    """The first launch of a new specialization goes through the dispatch, a repeat launches directly with
    the same launcher arguments, and the compiled kernel is one not seen before (in ``seen_hashes``)."""
    dispatches = len(DISPATCHES)
    launcher(3, args, constexprs, num_warps)
    if len(DISPATCHES) != dispatches + 1:
        fail(f"{name}: a new specialization must go through Triton's dispatch")
    by_dispatch = LAUNCHES[-1]
    launcher(3, args, constexprs, num_warps)
    if len(DISPATCHES) != dispatches + 1:
        fail(f"{name}: a repeated launch went through the dispatch again")
    direct = LAUNCHES[-1]
    # Recorded: (kernel hash, grid x, y, z, stream, function, packed metadata, launch metadata, enter
    # hook, exit hook, *arguments). Without hooks installed the dispatch passes its empty hook chains
    # (and metadata for them), the direct launch passes None: the launcher calls nothing either way.
    if direct[7:10] != (None, None, None) or not all(launch_module._is_empty_hook(h) for h in by_dispatch[8:10]):
        fail(f"{name}: hooks {by_dispatch[8:10]} (dispatch) / {direct[7:10]} (direct) are not both empty")
    same = direct[:7] + direct[10:], by_dispatch[:7] + by_dispatch[10:]
    if len(same[0]) != len(same[1]) or not all(map(identical, *same)):
        fail(f"{name}: direct launch {same[0]} differs from the dispatch's {same[1]}")
    if direct[0] in seen_hashes:
        fail(f"{name}: compiled the same kernel as '{seen_hashes[direct[0]]}'; the set does not test a new key")
    seen_hashes[direct[0]] = name
    print(f"{name}: ok (dispatch once, then direct with identical launcher arguments)")


def same_launch(planned: tuple, dispatched: tuple) -> bool:
    """Two recorded launches of one call made twice hand the launcher the same values: the same grid,
    stream, function, metadata and plain arguments, and tensors that stand in the same place (the
    caller's own, or new allocations of the same dtype, shape and 16-byte alignment)."""
    a, b = planned[:7] + planned[10:], dispatched[:7] + dispatched[10:]

    def alike(x, y) -> bool:
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            return (x is y or (x.dtype == y.dtype and x.shape == y.shape
                               and x.data_ptr() % 16 == y.data_ptr() % 16 == 0))
        return identical(x, y)

    return len(a) == len(b) and all(map(alike, a, b))


def describe(launch: tuple) -> tuple:
    """A recorded launch, each tensor shown as its dtype, shape and offset from 16-byte alignment."""
    return tuple(f"{t.dtype}{list(t.shape)}+{t.data_ptr() % 16}" if isinstance(t, torch.Tensor) else t
                 for t in launch)


def launcher_calls():
    """(name, launcher, call): calls of the real launchers, each a different plan from every other."""
    buffer = torch.zeros(8192 + 8, dtype=torch.bfloat16)
    aligned, misaligned = buffer[:8192], buffer[1:8193]

    def quantize(x, bits=4, group_size=256, sigma=False, stochastic=False, seed=0, offset=0):
        return lambda: triton_quantize(x, bits, group_size, sigma, stochastic, seed, offset)

    yield "quantize bf16", _launch_quantize, quantize(aligned)
    yield "quantize bf16, input 2 bytes past alignment", _launch_quantize, quantize(misaligned)
    yield "quantize bf16, one group", _launch_quantize, quantize(buffer[:200])
    yield "quantize bf16, 17 groups (not even)", _launch_quantize, quantize(buffer[:4300])
    yield "quantize fp32", _launch_quantize, quantize(torch.zeros(8192))
    yield "quantize fp16, 2 bits", _launch_quantize, quantize(aligned.half(), bits=2)
    yield "quantize bf16, 8 bits, groups of 64", _launch_quantize, quantize(aligned, bits=8, group_size=64)
    yield "quantize bf16, sigma", _launch_quantize, quantize(aligned, sigma=True)
    yield "quantize bf16, stochastic", _launch_quantize, quantize(aligned, stochastic=True, seed=7, offset=5)
    yield "quantize bf16, stochastic, offset beyond int32", _launch_quantize, quantize(
        aligned, stochastic=True, seed=7, offset=2**40)

    def forced(config, call):
        def run():
            with use_config(config):
                return call()
        return run

    # The same tile, one program for each tile or for two of them: two plans.
    yield "quantize bf16, 4 rows x 4 warps", _launch_quantize, forced((4, 4, 1), quantize(aligned))
    yield "quantize bf16, 4 rows x 4 warps, 2 tiles a program", _launch_quantize, forced((4, 4, 2), quantize(aligned))

    payload, meta = triton_quantize(aligned, 4, 256, False, False, 0, 0)
    payload_bytes = torch.zeros(payload.numel() + 16, dtype=torch.uint8)

    def dequantize(payload, out, activation=None):
        activated = None if activation is None else torch.empty_like(out)
        return lambda: triton_dequantize(payload, meta, out, 4, 256, activation=activation, activated=activated)

    yield "dequantize bf16", _launch_dequantize, dequantize(payload, torch.empty(8192, dtype=torch.bfloat16))
    yield "dequantize bf16, payload 8 bytes past alignment", _launch_dequantize, dequantize(
        payload_bytes[8:8 + payload.numel()], torch.empty(8192, dtype=torch.bfloat16))
    yield "dequantize fp32", _launch_dequantize, dequantize(payload, torch.empty(8192))
    yield "dequantize bf16, gelu", _launch_dequantize, dequantize(
        payload, torch.empty(8192, dtype=torch.bfloat16), "gelu")

    # Packings through the codec (tq.quantize and tq.dequantize, the pack and unpack hooks, a compiled
    # graph's ops), which after their first call of a kind launch what it prepared (codec.quantize_repeated,
    # codec.dequantize_repeated). REPEATED names those that must get there.
    import tritonquant

    yield "tq.quantize bf16", _launch_quantize, lambda: tritonquant.quantize(aligned, bits=4, backend="triton")
    yield "tq.quantize bf16, stochastic", _launch_quantize, lambda: tritonquant.quantize(
        aligned, bits=4, stochastic=True, seed=7, backend="triton")
    broadcast = tritonquant.quantize(aligned[:256].expand(32, 256), bits=4, backend="triton")
    yield "tq.dequantize bf16, broadcast", _launch_dequantize, lambda: tritonquant.dequantize(broadcast,
                                                                                            backend="triton")
    ops = torch.ops.tritonquant

    def pack_op(x, bits=4, scheme="minmax"):
        return lambda: ops.pack_saved(x, bits, 256, scheme, False, "triton")

    def unpack_op(packed, like):
        payload, meta = packed
        return lambda: ops.unpack_saved(payload, meta, list(like.shape), list(like.stride()),
                                        PACKED_DTYPES.index(like.dtype), 4, 256, "minmax", "triton")

    channels_last = torch.zeros(2, 64, 8, 8, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    yield "pack_saved bf16", _launch_quantize, pack_op(aligned)
    yield "pack_saved fp32, sigma, 2 bits", _launch_quantize, pack_op(torch.zeros(8192), 2, "sigma")
    yield "pack_saved bf16, channels-last", _launch_quantize, pack_op(channels_last)
    yield "pack_saved bf16, input 2 bytes past alignment", _launch_quantize, pack_op(misaligned)
    packed = ops.pack_saved(aligned, 4, 256, "minmax", False, "triton")
    yield "unpack_saved bf16", _launch_dequantize, unpack_op(packed, aligned)
    yield "unpack_saved fp32", _launch_dequantize, unpack_op(packed, torch.zeros(8192))
    yield "unpack_saved bf16, channels-last", _launch_dequantize, unpack_op(
        ops.pack_saved(channels_last, 4, 256, "minmax", False, "triton"), channels_last)
    yield "unpack_saved bf16, payload 8 bytes past alignment", _launch_dequantize, unpack_op(
        (payload_bytes[8:8 + packed[0].numel()], packed[1]), aligned)


REPEATED = ("tq.quantize bf16", "tq.dequantize bf16, broadcast", "pack_saved bf16", "pack_saved fp32, sigma, 2 bits",
            "pack_saved bf16, channels-last", "unpack_saved bf16", "unpack_saved fp32",
            "unpack_saved bf16, channels-last")


def check_planned_launches() -> None:
    """Each call, made four times: every launch the same as the dispatch's for the same call (made
    right after it with direct launches off), and the last ones from a plan (no specialization computed)."""
    specializations = []
    for launcher in (_launch_quantize, _launch_dequantize):
        key = launcher._key

        def counting_key(*args, _key=key):
            specializations.append(1)
            return _key(*args)

        launcher._key = counting_key
    repeated = []
    for name in ("quantize_repeated", "dequantize_repeated"):
        function = getattr(codec, name)

        def recording(*args, _function=function):
            launched = _function(*args)
            repeated.append(launched is not None and launched is not False)
            return launched

        setattr(codec, name, recording)
    for name, launcher, call in launcher_calls():
        for attempt in range(4):
            computed = len(specializations)
            repeated.clear()
            call()
            launched = LAUNCHES[-1]
            planned = len(specializations) == computed
            from_prepared = repeated == [True]
            launch_module.DIRECT_LAUNCH = False
            try:
                call()
            finally:
                launch_module.DIRECT_LAUNCH = True
            if not same_launch(launched, LAUNCHES[-1]):
                fail(f"{name}, call {attempt + 1}: launched {describe(launched)} where the dispatch launches "
                     f"{describe(LAUNCHES[-1])}")
        if not planned:
            fail(f"{name}: the fourth call still computed Triton's specialization (no plan)")
        if from_prepared != (name in REPEATED):
            fail(f"{name}: the fourth call {'did not launch' if name in REPEATED else 'launched'} what the "
                 "first call prepared")
        how = ", what the first call prepared" if from_prepared else ""
        print(f"{name}: ok (as the dispatch launches, from a plan by the fourth call{how})")


def check_repeated_ops() -> None:
    """The pack op counts a tensor alike whether it launched through the full path or from what it
    prepared, and a change of the tuned configs (``autotune.reset``) makes it work its launch out again."""
    import tritonquant

    x = torch.zeros(3, 4096, dtype=torch.bfloat16)  # (a kind no other check packs)
    calls = []
    quantize_repeated = codec.quantize_repeated

    def recording(*args):
        launched = quantize_repeated(*args)
        calls.append(launched is not None)
        return launched

    codec.quantize_repeated = recording
    try:
        with tritonquant.compress(bits=4, backend="triton") as session:
            for _ in range(4):
                torch.ops.tritonquant.pack_saved(x, 4, 256, "minmax", False, "triton")
            full = tritonquant.quantize(x, bits=4, backend="triton")
            stats = session.stats
            if calls[-1] is not True:
                fail(f"pack op: the fourth call did not launch what the first prepared ({calls})")
            if (stats.packed_tensors, stats.raw_bytes, stats.packed_bytes) != (4, 4 * full.raw_nbytes, 4 * full.nbytes):
                fail(f"pack op: counted {stats.packed_tensors} tensors, {stats.raw_bytes} bytes into "
                     f"{stats.packed_bytes}; expected 4, {4 * full.raw_nbytes} into {4 * full.nbytes}")
            calls.clear()
            autotune.reset()
            for _ in range(3):
                torch.ops.tritonquant.pack_saved(x, 4, 256, "minmax", False, "triton")
            if calls != [False, True, True]:
                fail(f"pack op after autotune.reset(): launched from the prepared launch {calls}; expected "
                     "[False, True, True] (the stale one refused, then prepared again)")
    finally:
        codec.quantize_repeated = quantize_repeated
    print("pack op: ok (counted alike both ways; prepared again after the tuned configs changed)")


def main() -> None:
    launcher = KernelLauncher(_quantize_kernel)
    if not launcher._direct:
        print("SKIP: KernelLauncher fell back to Triton's dispatch for a compiled kernel")
        sys.exit(2)
    seen_hashes = {}
    for name, args, constexprs, num_warps in argument_sets():
        check_dispatch_then_direct(launcher, name, args, constexprs, num_warps, seen_hashes)

    # The dequantize kernel's activation is a string constexpr, passed on to the launcher as it is.
    dequantize_launcher = KernelLauncher(_dequantize_kernel)
    payload, meta, out, activated = (torch.zeros(2048, dtype=torch.uint8), torch.zeros(16, 2),
                                     torch.zeros(4096, dtype=torch.bfloat16), torch.zeros(4096, dtype=torch.bfloat16))
    args = (payload, meta, out, activated, 4096, 16, meta, 1, 1)
    constexprs = dict(BITS=4, GROUP=256, ROWS=4, STANDARDIZE=False, INDEX64=False, ROW_CHANNELS=False,
                      HARDWARE_CAST=True, EVEN=True)
    for activation in ("none", "gelu", "silu"):
        check_dispatch_then_direct(dequantize_launcher, f"dequantize, ACTIVATION={activation!r}", args,
                                   {**constexprs, "ACTIVATION": activation}, 4, seen_hashes)

    # seed and rng_offset are declared do_not_specialize: values Triton would otherwise specialize on
    # (1, a multiple of 16 or not) launch the base set's kernel directly, with no dispatch and no compile.
    name, args, constexprs, num_warps = next(argument_sets())
    base_hash = next(h for h, n in seen_hashes.items() if n == name)
    for index, value in ((5, 1), (5, 17), (6, 1), (6, 16), (6, 2**31 - 1)):
        dispatches = len(DISPATCHES)
        launcher(3, args[:index] + (value,) + args[index + 1:], constexprs, num_warps)
        if len(DISPATCHES) != dispatches or LAUNCHES[-1][0] != base_hash:
            fail(f"argument {index} = {value}: must launch the base set's kernel directly (do_not_specialize)")
    print("seed and rng_offset values: ok (the base set's kernel, launched directly)")

    check_planned_launches()
    check_repeated_ops()

    try:  # an argument error is the dispatch's to report...
        launcher(3, args, {k: v for k, v in constexprs.items() if k != "BITS"}, num_warps)
    except TypeError:
        pass
    else:
        fail("a missing constexpr must raise")
    dispatches = len(DISPATCHES)
    launcher(3, args, constexprs, num_warps)
    if len(DISPATCHES) != dispatches:
        fail("after an argument error, a known specialization must still launch directly")
    print("argument error: ok (raised by the dispatch; direct launches stay on)")

    def hook(metadata):
        return None

    chain = knobs.runtime.launch_enter_hook
    if hasattr(chain, "add"):  # Triton 3.6+: a chain of hooks
        chain.add(hook)
    else:
        knobs.runtime.launch_enter_hook = hook
    try:
        dispatches = len(DISPATCHES)
        launcher(3, args, constexprs, num_warps)
        if len(DISPATCHES) != dispatches + 1:
            fail("with a launch hook installed the dispatch must run (hooks read its launch metadata)")
    finally:
        if hasattr(chain, "remove"):
            chain.remove(hook)
        else:
            knobs.runtime.launch_enter_hook = chain
    print("launch hook installed: ok (dispatch)")

    launch_module.DIRECT_LAUNCH = False
    dispatches = len(DISPATCHES)
    launcher(3, args, constexprs, num_warps)
    if len(DISPATCHES) != dispatches + 1:
        fail("TRITONQUANT_DIRECT_LAUNCH=0 must always use the dispatch")
    print("direct launch switched off: ok (dispatch)")


if __name__ == "__main__":
    main()
