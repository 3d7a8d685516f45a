"""benchmarks/peak_breakdown.py runs without a GPU and finds where each method's step peaks.

A transformer of one block with a 4,000-word head, batch 2 x 256: the head's log-softmax (float32,
2 x 256 x 4,000 = 7.8 MB a tensor) outweighs a block's activations, as GPT-2 small's does at batch 8.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "peak_breakdown.py"


@pytest.mark.cpu_only
def test_peak_breakdown_finds_each_methods_peak_and_what_it_holds():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--layers", "1", "--vocab", "4000", "--seq", "256",
                             "--batch", "2"], capture_output=True, text=True, env=env, timeout=900)
    if result.returncode == 2:
        pytest.skip(result.stdout.strip())
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {m[1]: (float(m[2]), float(m[3]), m[4]) for m in re.finditer(
        r"^\| (exact|checkpoint|tq-4bit|tq-2bit|checkpoint\+tq-4bit)\s+\|\s+([\d.]+)\s+\|\s+([\d.]+)\s+\|\s+(\w+, \S+)", result.stdout,
        re.MULTILINE)}
    assert rows.keys() == {"exact", "checkpoint", "tq-4bit", "tq-2bit", "checkpoint+tq-4bit"}, result.stdout
    after_forward = {method: row[1] for method, row in rows.items()}
    assert after_forward["tq-2bit"] < after_forward["tq-4bit"] < after_forward["exact"], result.stdout
    assert after_forward["checkpoint+tq-4bit"] < after_forward["checkpoint"] < after_forward["exact"], result.stdout
    # Every method peaks in backward; exact training at the head, as log-softmax's backward allocates.
    assert all(row[2].startswith("backward, ") for row in rows.values()), result.stdout
    assert rows["exact"][2] == "backward, aten::_log_softmax_backward_data", result.stdout
    assert all(rows[method][0] < rows["exact"][0] for method in rows.keys() - {"exact"}), result.stdout
