"""benchmarks/host_stand_in.py runs without a GPU and measures what a ResNet-50 step saves, by kind.

The counts are the pack policy's decisions on ResNet-50 under bf16 autocast (batch 1, 64 px, the
script's min_bytes): they change only when the policy does, and the figures beside them only mean
something while they hold.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "host_stand_in.py"


@pytest.mark.cpu_only
def test_stand_in_host_profile_runs_and_counts_what_resnet50_saves():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--repeats", "1"], capture_output=True, text=True,
                            env=env, timeout=900)
    if result.returncode == 2:
        pytest.skip(result.stdout.strip())
    assert result.returncode == 0, result.stderr[-3000:]
    found = [(m[1], m[2].strip(), int(m[3]), float(m[4])) for m in re.finditer(
        r"^\| (pack|unpack)\s+\|\s+([A-Za-z ()]+?)\s+\|\s+(\d+)\s+\|\s+([\d.]+)\s+\|", result.stdout, re.MULTILINE)]
    rows = {kind: (count, us) for hook, kind, count, us in found if hook == "pack"}
    unpacked = {kind: count for hook, kind, count, _ in found if hook == "unpack"}
    # Per step: 72 activations packed and 36 saves that reuse one; 53 autocast weight casts made again in
    # backward (every convolution and the head); the stem pool's indices as window positions.
    assert {"Packed", "Packed (reused)", "RecastWeight", "WindowIndices"} <= rows.keys(), result.stdout
    assert rows["Packed"][0] == 72 and rows["Packed (reused)"][0] == 36, result.stdout
    assert rows["RecastWeight"][0] == 53 and rows["WindowIndices"][0] == 1, result.stdout
    assert all(us > 0 for _, _, _, us in found)  # (wall time inside the hook: positive however noisy)
    # Backward unpacks every save once. (Where saves share one handle, its unpacks count under the kind
    # of its first save: the split between "Packed" and "Packed (reused)" is not the pack hook's.)
    assert sum(unpacked.values()) == sum(count for count, _ in rows.values()), result.stdout
    assert unpacked["Packed"] + unpacked.get("Packed (reused)", 0) == 72 + 36, result.stdout
    assert unpacked["RecastWeight"] == 53 and unpacked["Kept"] == rows["Kept"][0], result.stdout
    # The launch rows that the GPU suite's host stage measures too: the kernel's arguments as triton_quantize
    # passes them, through the dispatch and directly.
    assert re.search(r"launch, KernelLauncher direct path\s+\|\s+[\d.]+\s+\|", result.stdout), result.stdout
    # The hooks timed from inside the tanh chain, caches warm and evicted: every figure positive.
    cache_rows = re.findall(r"^\| (caches warm|\d+ MiB of host memory copied between saves)\s+\|\s+([\d.]+)\s+\|"
                            r"\s+([\d.]+)\s+\|$", result.stdout, re.MULTILINE)
    assert [row[0] for row in cache_rows] == ["caches warm", "1 MiB of host memory copied between saves",
                                              "32 MiB of host memory copied between saves"], result.stdout
    assert all(float(pack) > 0 and float(unpack) > 0 for _, pack, unpack in cache_rows), result.stdout
    # Differences of timings: present, but on a loaded machine any sign.
    assert re.search(r"tanh chain, direct launches\s+\|\s+-?[\d.]+\s+\|\s+-?[\d.]+\s+\|", result.stdout), result.stdout
