"""benchmarks/host_ab.py loads a git revision's package beside the checkout's and times both in turn."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]
SCRIPT = REPO / "benchmarks" / "host_ab.py"

pytestmark = [
    pytest.mark.cpu_only,
    pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs a git checkout"),
]


def run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                            timeout=600)
    if result.returncode == 2 and result.stdout.startswith("SKIP"):
        pytest.skip(result.stdout.strip())
    return result


@pytest.mark.parametrize("evict", ["0", "65536"], ids=["caches-warm", "caches-evicted"])
def test_the_checkout_against_a_revision_gives_both_figures_and_their_ratio(evict):
    result = run("--base", "HEAD", "--rounds", "2", "--evict", evict)
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("65536 bytes of host memory copied between saved tensors" in result.stdout) == (evict != "0"), result.stdout
    rows = re.findall(r"^\| (pack hook|unpack hook|whole chain), us per saved tensor\s+\|\s+([\d.]+)\s+\|"
                      r"\s+([\d.]+)\s+\|\s+([\d.]+)\s+\|$", result.stdout, re.MULTILINE)
    assert [row[0] for row in rows] == ["pack hook", "unpack hook", "whole chain"], result.stdout
    for _, base, checkout, ratio in rows:
        base, checkout, ratio = float(base), float(checkout), float(ratio)
        assert base > 0 and checkout > 0, result.stdout  # (every saved tensor went through the hooks)
        # (The figures are printed to 0.1 us and the ratio, of the unrounded ones, to 0.001.)
        low, high = (checkout - 0.05) / (base + 0.05), (checkout + 0.05) / (base - 0.05)
        assert low - 0.0005 <= ratio <= high + 0.0005, result.stdout
    traced = re.search(r"^\| traced ops, us per pack_saved \+ unpack_saved\s+\|\s+([\d.]+)\s+\|\s+([\d.]+)\s+\|",
                       result.stdout, re.MULTILINE)
    assert traced is not None and float(traced[1]) > 0 and float(traced[2]) > 0, result.stdout


def test_a_negative_eviction_is_refused_by_name():
    result = run("--base", "HEAD", "--evict", "-1")
    assert result.returncode == 2 and "--evict must be 0 or more, got -1" in result.stderr


def test_an_unknown_revision_is_reported_by_name():
    result = run("--base", "no-such-revision-xyz", "--rounds", "1")
    assert result.returncode == 1
    assert "cannot read revision 'no-such-revision-xyz'" in result.stderr
