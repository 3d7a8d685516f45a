"""benchmarks/device_ledger.py counts the device work that a compressed ResNet-50 step's hooks add.

At 4 bits under bf16 autocast every byte the pack hook moves goes through a Triton kernel, pooling
indices included, and the unpack hook's only torch work is the weight casts made again in backward:
a torch op that appears in either hook is device work that the kernels were meant to replace.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "device_ledger.py"


@pytest.mark.cpu_only
def test_the_ledger_of_a_resnet50_step_holds_only_kernels_and_weight_casts():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--size", "64", "--batches", "2,4", "--project", "4"],
                            capture_output=True, text=True, env=env, timeout=900)
    if result.returncode == 2:
        pytest.skip(result.stdout.strip())
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {(m[1], m[2]): (int(m[3]), float(m[4])) for m in re.finditer(
        r"^\| (Triton|torch, pack hook|torch, unpack hook)\s+\| (\S[^|]*?)\s+\|\s+(\d+)\s+\|\s+([\d.]+)\s+\|",
        result.stdout, re.MULTILINE)}
    assert rows, result.stdout
    assert rows[("Triton", "quantize")][0] > 0 and rows[("Triton", "dequantize")][0] > 0, result.stdout
    # Every packing is decoded at least once in backward (the script itself checks the packings' count),
    # whether its launch was worked out for it or repeated from its kind's first.
    assert rows[("Triton", "dequantize")][0] >= rows[("Triton", "quantize")][0], result.stdout
    # The stem pool's indices: one launch each way, as many bytes each way (int64 indices and their codes).
    encode, decode = rows[("Triton", "encode pool indices")], rows[("Triton", "decode pool indices")]
    assert encode[0] == decode[0] == 1 and encode[1] == decode[1] > 0, result.stdout
    assert not [row for row in rows if row[0] == "torch, pack hook"], result.stdout
    assert [row[1] for row in rows if row[0] == "torch, unpack hook"] == ["_to_copy"], result.stdout
    total = re.search(r"^\| total\s+\|\s+\|\s+(\d+)\s+\|", result.stdout, re.MULTILINE)
    assert total and int(total[1]) == sum(calls for calls, _ in rows.values()), result.stdout
