"""benchmarks/bytes_in_flight.py compiles quantize tiles for sm_90 without a GPU and counts what an SM holds."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "bytes_in_flight.py"
ROW = re.compile(r"^\| (bf16|fp32)\s+\| (\d)\s+\| (\d+) x (\d+)\s+\| (tuned \(bucket \d+\)|default)\s+\| (\d+)\s+\| (\d+)\s+"
                 r"\| (\d+)\s+\| ([\d.]+)\s+\| ([\d.]+)\s+\|$", re.MULTILINE)


def run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600)
    if result.returncode == 2 and result.stdout.startswith("SKIP"):
        pytest.skip(result.stdout.strip())
    return result


@pytest.mark.cpu_only
def test_tuned_and_default_tiles_with_their_registers_and_residency(tmp_path):
    cache = tmp_path / "autotune.json"
    entry = {"kind": "quantize", "dtype": "bf16", "bits": 4, "group_size": 256, "sigma": False, "stochastic": False,
             "rows": 32, "num_warps": 4}
    cache.write_text(json.dumps({"entries": [{**entry, "bucket": 12, "rows": 8, "num_warps": 2},
                                             {**entry, "bucket": 13},  # the largest bucket decides
                                             {**entry, "bucket": 13, "kind": "dequantize", "rows": 64}]}))
    result = run("--cache", str(cache), "--dtypes", "bf16", "--bits", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = ROW.findall(result.stdout)
    assert [(r[2], r[3], r[4]) for r in rows] == [("32", "4", "tuned (bucket 13)"), ("16", "4", "default")], result.stdout
    for dtype, bits, tile_rows, warps, _, registers, tiles, warps_per_sm, tile_kb, sm_kb in rows:
        registers, tiles, warps_per_sm = int(registers), int(tiles), int(warps_per_sm)
        assert 16 <= registers <= 255
        assert 1 <= tiles <= 32 and warps_per_sm == tiles * int(warps) <= 64
        # (registers are allocated 256 a warp: the tiles fit in the SM's 65,536, one more would not)
        per_tile = -(-registers * 32 // 256) * 256 * int(warps)
        assert tiles * per_tile <= 65536 and (tiles == 32 or warps_per_sm + int(warps) > 64
                                              or (tiles + 1) * per_tile > 65536)
        assert float(tile_kb) == int(tile_rows) * 256 * 2 / 1024
        assert float(sm_kb) == tiles * float(tile_kb)


def test_bad_arguments_are_refused_by_name(tmp_path):
    result = run("--bits", "3")
    assert result.returncode == 2 and "--bits must name some of 1, 2, 4, 8, got '3'" in result.stderr
    result = run("--dtypes", "int8")
    assert result.returncode == 2 and "--dtypes must name some of bf16, fp16, fp32" in result.stderr
    result = run("--cache", str(tmp_path / "missing.json"))
    assert result.returncode == 2 and "--cache: cannot read an autotune cache" in result.stderr
