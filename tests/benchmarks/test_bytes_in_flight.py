"""benchmarks/bytes_in_flight.py compiles quantize tiles for sm_90 without a GPU and counts what an SM holds."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "bytes_in_flight.py"
ROW = re.compile(r"^\| (bf16|fp32)\s+\| (\d)\s+\| (\d+) x (\d+) x (\d+)\s+"
                 r"\| (tuned \(bucket \d+\)|default|pipelined candidate)\s+"
                 r"\| (\d+)\s+\| (\d+)\s+\| (\d+)\s+\| ([\d.]+)\s+\| ([\d.]+)\s+\| ([\d.]+)\s+\| (\d+)\s+\|$",
                 re.MULTILINE)


def run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600)
    if result.returncode == 2 and result.stdout.startswith("SKIP"):
        pytest.skip(result.stdout.strip())
    return result


@pytest.mark.cpu_only
def test_tuned_default_and_pipelined_tiles_with_their_registers_and_residency(tmp_path):
    cache = tmp_path / "autotune.json"
    entry = {"kind": "quantize", "dtype": "bf16", "bits": 4, "group_size": 256, "sigma": False, "stochastic": False,
             "rows": 32, "num_warps": 4}
    cache.write_text(json.dumps({"entries": [{**entry, "bucket": 12, "rows": 8, "num_warps": 2},
                                             {**entry, "bucket": 13, "tiles": 2},  # the largest bucket decides
                                             {**entry, "bucket": 13, "kind": "dequantize", "rows": 64}]}))
    result = run("--cache", str(cache), "--dtypes", "bf16", "--bits", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = ROW.findall(result.stdout)
    assert [r[2:6] for r in rows] == [("32", "4", "2", "tuned (bucket 13)"), ("16", "4", "1", "default"),
                                      ("8", "2", "4", "pipelined candidate"), ("16", "2", "4", "pipelined candidate"),
                                      ("16", "4", "4", "pipelined candidate"), ("32", "4", "4", "pipelined candidate")
                                      ], result.stdout
    registers_by_config = {}
    for dtype, bits, tile_rows, warps, tiles, _, registers, programs, warps_per_sm, tile_kb, sm_kb, loading, _ in rows:
        registers, programs, warps_per_sm = int(registers), int(programs), int(warps_per_sm)
        registers_by_config[tile_rows, warps, tiles] = registers
        assert 16 <= registers <= 255
        assert 1 <= programs <= 32 and warps_per_sm == programs * int(warps) <= 64
        # (registers are allocated 256 a warp: the programs fit in the SM's 65,536, one more would not)
        per_program = -(-registers * 32 // 256) * 256 * int(warps)
        assert programs * per_program <= 65536 and (programs == 32 or warps_per_sm + int(warps) > 64
                                                    or (programs + 1) * per_program > 65536)
        assert float(tile_kb) == int(tile_rows) * 256 * 2 / 1024
        assert float(sm_kb) == programs * float(tile_kb)
        assert float(loading) == (float(sm_kb) if tiles != "1" else 0.0)
    # The next tile's input costs registers: a pipelined program holds more than one tile a program.
    assert registers_by_config["16", "4", "4"] > registers_by_config["16", "4", "1"]

    # Capped: the pipelined candidates fit in 96 registers (spilling if they must), the others are as before.
    capped = ROW.findall(run("--cache", str(cache), "--dtypes", "bf16", "--bits", "4", "--maxnreg", "96").stdout)
    assert [r[2:6] for r in capped] == [r[2:6] for r in rows]
    spilled = {}
    for row in capped:
        registers, spilled[row[2:5]] = int(row[6]), int(row[12])
        if row[5] == "pipelined candidate":
            assert registers <= 96
        else:
            assert registers == registers_by_config[row[2:5]] and spilled[row[2:5]] == 0
    # 16 x 2 x 4 takes more than 96 registers uncapped: capped at 96, it spills.
    assert registers_by_config["16", "2", "4"] > 96 and spilled["16", "2", "4"] > 0


def test_bad_arguments_are_refused_by_name(tmp_path):
    result = run("--bits", "3")
    assert result.returncode == 2 and "--bits must name some of 1, 2, 4, 8, got '3'" in result.stderr
    result = run("--dtypes", "int8")
    assert result.returncode == 2 and "--dtypes must name some of bf16, fp16, fp32" in result.stderr
    result = run("--maxnreg", "300")
    assert result.returncode == 2 and "--maxnreg must be 16 to 255, got 300" in result.stderr
    result = run("--cache", str(tmp_path / "missing.json"))
    assert result.returncode == 2 and "--cache: cannot read an autotune cache" in result.stderr
