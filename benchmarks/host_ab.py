#!/usr/bin/env python
"""Host microseconds per saved tensor: this checkout against a git revision, timed in turn in one process.

    python benchmarks/host_ab.py --base HEAD~1 [--rounds 40]   # exits 2 if this Triton's driver API differs

Why: on a shared machine host timings drift by several times between runs (host_stand_in.py put the
tanh chain's pack hook at 19.7 us one day and at 82 us the next, for two commits that differ by 3%
when timed side by side), so a change to the pack path can only be judged against its base timed
alongside it. This script loads the revision's package (``git archive``) beside the checkout's, under
another name, installs the stand-in driver (benchmarks/stand_in_driver.py: kernels compiled for
sm_90, launches not run), and times the same work with each version in alternation, a fraction of a
second apart.

The work: a chain of tanh on a 64K-element bf16 tensor under compress(bits=4, backend="triton"); each
tanh saves its output, which is packed. With ``--evict BYTES`` a copy of that much host memory runs
between the links, so that the hooks find the CPU's caches as a real step leaves them (the whole-chain
figure then includes the copies). Per saved tensor:

  pack hook, unpack hook   wall time inside the hooks (a wrapper times each call);
  whole chain              forward and backward of the chain, without the wrapper, divided by its length:
                           includes tanh itself and what the hooks leave behind (freeing handles).

  traced ops               one call of ``pack_saved`` and one of ``unpack_saved`` on the chain's tensor: the
                           custom ops a model compiled under compress() calls per packed tensor
                           (tritonquant/traced.py), through torch's dispatcher, per pair.

With ``--resnet N``, also N rounds of one ResNet-50 step (bf16 autocast, batch 1, 64 px, the min_bytes of
host_stand_in.py), which saves every kind the policy knows (packed, reused, kept, weight casts, pooling
indices): milliseconds per step inside the pack and the unpack hook. The step's own CPU work is large
and not timed.

Each round runs both versions (the order alternates); the figures are the median of each version's
faster half of the rounds, and their ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ["TRITONQUANT_AUTOTUNE"] = "0"  # no tuning: there is nothing to time kernels on

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stand_in_driver  # noqa: E402

stand_in_driver.install_for_cpu_tensors()  # (patches the checkout's codec; the base's is patched on load)

import tritonquant  # noqa: E402
from profile_host import EvictHostCaches  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CHAIN_LENGTH = 50
ELEMENTS = 1 << 16
FIGURES = ("pack hook", "unpack hook", "whole chain")
TRACED_PAIRS = 50  # pack_saved + unpack_saved calls timed per round
RESNET_MIN_BYTES = 12_000  # host_stand_in.py's: what a 224 px batch-64 step packs, at batch 1 and 64 px


def load_revision(revision: str, into: Path):
    """The package as of ``revision``, imported as ``tritonquant_base`` (its imports are relative)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", revision, "tritonquant", "kernels"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    package = into / "tritonquant"
    (into / "kernels").rename(package / "kernels")  # where the installed package maps tritonquant.kernels
    spec = importlib.util.spec_from_file_location("tritonquant_base", package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["tritonquant_base"] = module
    spec.loader.exec_module(module)
    stand_in_driver.prepare_codec(module.codec)  # as install_for_cpu_tensors does for the checkout's
    return module


@contextlib.contextmanager
def timed_hooks(session):
    """While open, ``session``'s hooks add their wall time, in seconds, to the yielded [pack, unpack]
    list. (Open before the block opens: it reads the hooks then.) The pack hook is the block's own; the
    unpack hook is its class's, which every block's hooks call."""
    inside = [0.0, 0.0]
    pack, cls = session._pack, type(session)
    unpack = cls._unpack

    def timed_pack(t):
        started = time.perf_counter()
        handle = pack(t)
        inside[0] += time.perf_counter() - started
        return handle

    def timed_unpack(handle):
        started = time.perf_counter()
        t = unpack(handle)
        inside[1] += time.perf_counter() - started
        return t

    session._pack, cls._unpack = timed_pack, staticmethod(timed_unpack)
    try:
        yield inside
    finally:
        cls._unpack = staticmethod(unpack)


def chain_us(tq, x: torch.Tensor, timing: bool, evict: tuple | None = None) -> tuple[float, float, float]:
    """(pack hook, unpack hook, whole chain) microseconds per saved tensor; the hook figures are 0 unless
    ``timing`` (the wrapper that times them would otherwise count in the whole chain). ``evict``: host
    buffers (source, target) copied between the links (``profile_host.EvictHostCaches``), or None."""
    session = tq.compress(bits=4, backend="triton")
    with timed_hooks(session) if timing else contextlib.nullcontext([0.0, 0.0]) as inside:
        started = time.perf_counter()
        with session:
            y = x
            for _ in range(CHAIN_LENGTH):
                y = torch.tanh(y)
                if evict is not None:
                    y = EvictHostCaches.apply(y, *evict)
        y.float().sum().backward()
        del y
        whole = time.perf_counter() - started
    return inside[0] / CHAIN_LENGTH * 1e6, inside[1] / CHAIN_LENGTH * 1e6, whole / CHAIN_LENGTH * 1e6


def traced_pair_us(tq, x: torch.Tensor) -> float:
    """Microseconds per ``pack_saved`` + ``unpack_saved`` pair of ``tq``'s custom ops (their namespace is
    the package's name) on ``x``, as a compiled region calls them, 4 bits; NaN for a revision without them."""
    ops = getattr(torch.ops, tq.__name__)
    if not hasattr(tq, "traced") or not hasattr(ops, "pack_saved"):
        return float("nan")
    x = x.detach()
    dtype_code = tq.traced.PACKED_DTYPES.index(x.dtype)
    started = time.perf_counter()
    for _ in range(TRACED_PAIRS):
        payload, meta = ops.pack_saved(x, 4, 256, "minmax", False, "triton")
        ops.unpack_saved(payload, meta, list(x.shape), list(x.stride()), dtype_code, 4, 256, "minmax", "triton")
    return (time.perf_counter() - started) / TRACED_PAIRS * 1e6


def resnet_step_ms(tq, model, batch) -> tuple[float, float]:
    """(pack hook, unpack hook) milliseconds in one ResNet-50 step under compress(bits=4)."""
    from tritonquant.models import cnn_loss

    model.zero_grad(set_to_none=True)
    session = tq.compress(bits=4, backend="triton", min_bytes=RESNET_MIN_BYTES)
    with timed_hooks(session) as inside:
        with session, torch.autocast("cpu", dtype=torch.bfloat16):
            loss = cnn_loss(model, batch)
        loss.backward()
    return inside[0] * 1e3, inside[1] * 1e3


def faster_half_median(values: list[float]) -> float:
    ordered = sorted(values)
    return statistics.median(ordered[:max(1, len(ordered) // 2)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git revision to compare against (e.g. HEAD, HEAD~1, main)")
    parser.add_argument("--rounds", type=int, default=40, help="rounds, each timing both versions (default 40)")
    parser.add_argument("--resnet", type=int, default=0, metavar="N",
                        help="also N rounds of a ResNet-50 step, each timing both versions (default 0: none)")
    parser.add_argument("--evict", type=int, default=0, metavar="BYTES",
                        help="copy BYTES of host memory between the chain's links, as other code in a real step "
                             "would evict the hooks from the CPU's caches (default 0: caches warm)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.resnet < 0:
        parser.error(f"--resnet must be 0 or more, got {args.resnet}")
    if args.evict < 0:
        parser.error(f"--evict must be 0 or more, got {args.evict}")
    evict = (torch.empty(args.evict, dtype=torch.uint8), torch.empty(args.evict, dtype=torch.uint8)) if args.evict else None
    torch.set_num_threads(1)
    import triton

    with tempfile.TemporaryDirectory() as folder:
        try:
            base = load_revision(args.base, Path(folder))
        except subprocess.CalledProcessError as exc:
            print(f"cannot read revision {args.base!r}: {exc.stderr.decode(errors='replace').strip()}", file=sys.stderr)
            return 1
        versions = {"base": base, "checkout": tritonquant}
        x = torch.randn(ELEMENTS, dtype=torch.bfloat16, requires_grad=True)
        for tq in versions.values():  # warm-up: compile, allocate
            chain_us(tq, x, True, evict)
            chain_us(tq, x, False, evict)
            traced_pair_us(tq, x)
        samples: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in versions}
        for round_index in range(args.rounds):
            order = list(versions) if round_index % 2 else list(reversed(versions))
            for name in order:
                hooks = chain_us(versions[name], x, True, evict)
                whole = chain_us(versions[name], x, False, evict)
                samples[name].append((hooks[0], hooks[1], whole[2], traced_pair_us(versions[name], x)))
        steps: dict[str, list[tuple[float, float]]] = {name: [] for name in versions}
        if args.resnet:
            from tritonquant.models import ResNet50Like, cnn_batch

            torch.manual_seed(0)
            model, batch = ResNet50Like(), cnn_batch(1, size=64, classes=1000)
            for tq in versions.values():  # warm-up
                resnet_step_ms(tq, model, batch)
            for round_index in range(args.resnet):
                order = list(versions) if round_index % 2 else list(reversed(versions))
                for name in order:
                    steps[name].append(resnet_step_ms(versions[name], model, batch))

    print(f"torch {torch.__version__}, triton {triton.__version__}, Python {sys.version.split()[0]}; kernels "
          f"compiled for sm_90, launches not run. base = {args.base}, checkout = {REPO}; {args.rounds} rounds"
          f"{f'; {args.evict} bytes of host memory copied between saved tensors' if evict else ''}\n")
    rows = []
    for i, figure in enumerate(FIGURES):
        before = faster_half_median([sample[i] for sample in samples["base"]])
        after = faster_half_median([sample[i] for sample in samples["checkout"]])
        rows.append([f"{figure}, us per saved tensor", f"{before:.1f}", f"{after:.1f}", f"{after / before:.3f}"])
    before, after = (faster_half_median([sample[3] for sample in samples[name]]) for name in versions)
    rows.append(["traced ops, us per pack_saved + unpack_saved", f"{before:.1f}", f"{after:.1f}",
                 f"{after / before:.3f}"])
    if args.resnet:
        for i, figure in enumerate(("pack hook", "unpack hook")):
            before = faster_half_median([step[i] for step in steps["base"]])
            after = faster_half_median([step[i] for step in steps["checkout"]])
            rows.append([f"ResNet-50 step, {figure}, ms", f"{before:.2f}", f"{after:.2f}", f"{after / before:.3f}"])
    print(tabulate(rows, headers=["", "base", "checkout", "checkout / base"], tablefmt="github",
                   disable_numparse=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
