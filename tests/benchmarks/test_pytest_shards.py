"""benchmarks/pytest_shards.py: a pytest selection split over processes, results merged.

Each test runs the script on a small generated test file in tmp_path (no torch, no conftest), so
what is checked is the splitting, the merge and the signal handling, not this repository's tests.
"""

import argparse
import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "pytest_shards.py"
spec = importlib.util.spec_from_file_location("pytest_shards", SCRIPT)
pytest_shards = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pytest_shards)

GENERATED_TESTS = textwrap.dedent("""
    import os, pathlib, time
    import pytest

    @pytest.mark.parametrize("i", range(10))
    def test_numbered(i):
        pathlib.Path(os.environ["RAN_DIR"], f"numbered-{i}-pid{os.getpid()}").touch()

    def test_fails():
        assert 1 == 2, "one is not two"

    @pytest.mark.skip(reason="skipped on purpose")
    def test_skipped():
        pass

    @pytest.mark.slow
    def test_left_out_by_marker():
        raise AssertionError("deselected by -m, must not run")

    @pytest.mark.sleeper
    def test_sleeps():
        pathlib.Path(os.environ["RAN_DIR"], "sleeping").touch()
        time.sleep(60)
""")


@pytest.fixture
def project(tmp_path):
    (tmp_path / "test_generated.py").write_text(GENERATED_TESTS)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    slow: slow\n    sleeper: sleeps\n")
    (tmp_path / "ran").mkdir()
    return tmp_path


def run_script(project: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAN_DIR=str(project / "ran"))
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=project, env=env, capture_output=True, text=True,
                          timeout=timeout)


def merged_cases(junit: Path) -> dict[str, str]:
    """test name -> "passed" / "failure" / "error" / "skipped", from the merged report."""
    root = ElementTree.parse(junit).getroot()
    assert root.tag == "testsuites"
    cases = {}
    for case in root.iter("testcase"):
        if case.get("name") is None:
            # A shard interrupted mid-test writes that test as a <testcase> without a name: not a result
            # (pytest_shards.print_results skips it too). Under load both shards of the SIGINT test can be.
            continue
        problems = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        assert case.get("name") not in cases, f"{case.get('name')} reported twice"
        cases[case.get("name")] = problems[0] if problems else "passed"
    return cases


@pytest.mark.parametrize("shards", [1, 3, 13], ids=["one-shard", "three-shards", "more-shards-than-tests"])
def test_every_selected_test_runs_once_and_results_merge(project, shards):
    junit = project / "out" / "all.xml"
    proc = run_script(project, "--shards", str(shards), "--junitxml", str(junit), "--",
                      "-q", "-p", "no:cacheprovider", "-m", "not slow and not sleeper", "test_generated.py")
    assert proc.returncode == 1, proc.stdout + proc.stderr  # test_fails failed
    cases = merged_cases(junit)
    assert cases == {**{f"test_numbered[{i}]": "passed" for i in range(10)},
                     "test_fails": "failure", "test_skipped": "skipped"}
    ran = sorted(p.name for p in (project / "ran").iterdir())
    assert [name.split("-pid")[0] for name in ran] == sorted(f"numbered-{i}" for i in range(10))
    assert len({name.split("-pid")[1] for name in ran}) == min(shards, 10), "the tests spread over the shards"
    root = ElementTree.parse(junit).getroot()
    assert (root.get("tests"), root.get("failures"), root.get("skipped")) == ("12", "1", "1")
    assert "12 tests: 10 passed, 1 failed or errors, 1 skipped" in proc.stdout
    assert "FAILURE test_generated::test_fails: AssertionError: one is not two" in proc.stdout
    assert "skipped 1: skipped on purpose" in proc.stdout
    assert sorted(p.name for p in (project / "out" / "all-shards").glob("*.log")) == sorted(
        f"shard-{k}.log" for k in range(shards))


def test_exit_status_passed_and_no_tests(project):
    junit = project / "out.xml"
    passed = run_script(project, "--shards", "2", "--junitxml", str(junit), "--", "-q", "-p", "no:cacheprovider",
                        "-k", "numbered", "test_generated.py")
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert set(merged_cases(junit).values()) == {"passed"}
    nothing = run_script(project, "--shards", "2", "--junitxml", str(junit), "--", "-q", "-p", "no:cacheprovider",
                         "-k", "no_test_has_this_name", "test_generated.py")
    assert nothing.returncode == 5, nothing.stdout + nothing.stderr


def test_sigint_stops_every_shard_and_keeps_the_finished_results(project):
    junit = project / "out" / "all.xml"
    env = dict(os.environ, RAN_DIR=str(project / "ran"))
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--shards", "2", "--grace", "20", "--junitxml", str(junit),
                             "--", "-q", "-p", "no:cacheprovider", "-k", "numbered or sleeps", "test_generated.py"],
                            cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not (project / "ran" / "sleeping").exists():
        assert time.monotonic() < deadline and proc.poll() is None, "the sleeping test never started"
        time.sleep(0.1)
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)  # to the script alone: it passes the signal on
    out, _ = proc.communicate(timeout=60)
    assert time.monotonic() - started < 15, "the shards stopped at the signal, not at the 60 s sleep nor the grace"
    assert proc.returncode == 2, out  # pytest's "interrupted"
    assert "SIGINT: stopping the shards" in out and "interrupted" in out
    cases = merged_cases(junit)
    assert "test_sleeps" not in cases
    assert set(cases.values()) <= {"passed"}


def test_bad_arguments_name_what_is_allowed(project):
    proc = run_script(project, "--shards", "0", "--junitxml", "x.xml", "--", "test_generated.py")
    assert proc.returncode == 2 and "--shards must be at least 1, got 0" in proc.stderr
    proc = run_script(project, "--junitxml", "x.xml", "--", "--junitxml=y.xml", "test_generated.py")
    assert proc.returncode == 2 and "--junitxml and --shard are set per shard" in proc.stderr
    for bad in ("2/2", "-1/3", "1", "a/b"):
        with pytest.raises(argparse.ArgumentTypeError, match="--shard must be K/N"):
            pytest_shards.parse_shard(bad)
    assert pytest_shards.parse_shard("2/3") == (2, 3)
