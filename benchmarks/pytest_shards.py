"""Run one pytest selection as N pytest processes at once, and merge their results.

On a GPU, a test run is mostly Triton compiling kernels: one CPU core per compile, while the GPU idles.
The GPU suite (benchmarks/gpu_suite.sh) runs its test stages through this script so that a 16-core
GPU machine compiles on several cores, and the measurements after the tests keep their share of the
suite's time.

    python benchmarks/pytest_shards.py --shards 8 --junitxml results/pytest-gpu.xml -- -q -m gpu tests/

Each shard is ``python -m pytest <args> --shard=K/N`` with this file loaded as a pytest plugin. The
plugin keeps every N-th test of the selection (after ``-m``/``-k``), starting at the K-th, so each test
runs in exactly one shard and each shard keeps the selection's order (the suite orders its folders so
that what matters most runs first). A shard's output goes to ``<junit stem>-shards/shard-K.log``.
When all shards are done, their JUnit reports are merged into ``--junitxml``, and the failures, the
totals and the slowest tests are printed.

SIGINT or SIGTERM (the suite's stage timeout, Ctrl-C) is passed on to every shard once, as SIGINT:
pytest then stops and still writes its JUnit report. Shards still running ``--grace`` seconds later
are killed. (Shards run in their own sessions, so a signal sent to this script's process group does
not reach them twice.)

Exit status: 0 when every shard passed, 5 when no shard had a test to run, else the first other
shard exit status (1: tests failed, 2: interrupted, ...).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from collections import Counter
from pathlib import Path

import pytest

PLUGIN = Path(__file__).stem
PYTEST_OK, PYTEST_NO_TESTS = 0, 5


# ---------------------------------------------------------------------------------------------------
# The pytest plugin: --shard=K/N
# ---------------------------------------------------------------------------------------------------


def parse_shard(value: str) -> tuple[int, int]:
    """"K/N" -> (K, N), with 0 <= K < N."""
    try:
        index, count = (int(part) for part in value.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard must be K/N with integers 0 <= K < N, got {value!r}") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"--shard must be K/N with 0 <= K < N, got {value!r}")
    return index, count


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--shard", type=parse_shard, default=None, metavar="K/N",
                     help="run only every N-th selected test, starting at the K-th (0-based)")


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected theirs: shards share what is left
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    shard = config.getoption("--shard")
    if shard is None:
        return
    index, count = shard
    keep = items[index::count]
    kept = set(map(id, keep))
    config.hook.pytest_deselected(items=[item for item in items if id(item) not in kept])
    items[:] = keep


# ---------------------------------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------------------------------


def default_shards() -> int:
    """Half the cores (Triton's compiles are single-threaded; the rest is left to the GPU's host
    work and to the compiler's own processes), at least 1, at most 8."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def shard_command(pytest_args: list[str], index: int, count: int, junit: Path) -> list[str]:
    return [sys.executable, "-m", "pytest", "-p", PLUGIN, *pytest_args, f"--shard={index}/{count}",
            f"--junitxml={junit}"]


def run_shards(pytest_args: list[str], count: int, junitxml: Path, grace_s: float) -> int:
    log_dir = junitxml.with_name(junitxml.stem + "-shards")
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # The plugin is this file: importable by its name from its own folder.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent), env.get("PYTHONPATH")]))
    shards, logs = [], []
    for index in range(count):
        log = open(log_dir / f"shard-{index}.log", "w")
        logs.append(log)
        shards.append(subprocess.Popen(shard_command(pytest_args, index, count, log_dir / f"shard-{index}.xml"),
                                       stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True))
    print(f"pytest_shards: {count} shards running; logs in {log_dir}", flush=True)

    interrupted_at: list[float] = []

    def on_signal(signum: int, frame: object) -> None:
        if interrupted_at:
            return
        interrupted_at.append(time.monotonic())
        print(f"pytest_shards: {signal.Signals(signum).name}: stopping the shards", flush=True)
        for shard in shards:
            if shard.poll() is None:
                shard.send_signal(signal.SIGINT)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        start, last_note, done = time.monotonic(), time.monotonic(), set()
        while len(done) < count:
            for index, shard in enumerate(shards):
                if index not in done and shard.poll() is not None:
                    done.add(index)
                    print(f"pytest_shards: shard {index}/{count} exit {shard.returncode} after "
                          f"{time.monotonic() - start:.0f}s: {last_summary_line(log_dir / f'shard-{index}.log')}",
                          flush=True)
            if interrupted_at and time.monotonic() - interrupted_at[0] > grace_s:
                for index, shard in enumerate(shards):
                    if shard.poll() is None:
                        print(f"pytest_shards: shard {index}/{count} still running {grace_s:.0f}s after the "
                              "signal: killed", flush=True)
                        shard.kill()
                        shard.wait()
            if time.monotonic() - last_note > 30 and len(done) < count:
                last_note = time.monotonic()
                print(f"pytest_shards: {count - len(done)} of {count} shards still running "
                      f"({last_note - start:.0f}s)", flush=True)
            time.sleep(0.2)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for log in logs:
            log.close()

    reports = [log_dir / f"shard-{index}.xml" for index in range(count)]
    merge_junit(reports, junitxml)
    print_results(reports, log_dir)
    codes = [shard.returncode for shard in shards]
    if interrupted_at:
        print("pytest_shards: interrupted; the counts above are of the tests that finished", flush=True)
    failing = [code for code in codes if code not in (PYTEST_OK, PYTEST_NO_TESTS)]
    if failing:
        return failing[0]
    return PYTEST_OK if PYTEST_OK in codes else PYTEST_NO_TESTS


def last_summary_line(log: Path) -> str:
    """pytest's last line ("3 passed, 1 skipped in 12.0s"), or a note when the log has none."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][-200:] if lines else "(no output)"


def read_suites(report: Path) -> list[ElementTree.Element]:
    """The <testsuite> elements of one JUnit file; none when the shard wrote no readable report."""
    try:
        root = ElementTree.parse(report).getroot()
    except (OSError, ElementTree.ParseError):
        return []
    return [root] if root.tag == "testsuite" else list(root.iter("testsuite"))


def merge_junit(reports: list[Path], out: Path) -> None:
    """One JUnit file holding every shard's <testsuite>, with totals on the <testsuites> root."""
    root = ElementTree.Element("testsuites")
    for report in reports:
        root.extend(read_suites(report))
    for field in ("tests", "failures", "errors", "skipped"):
        root.set(field, str(sum(int(suite.get(field, 0)) for suite in root)))
    root.set("time", f"{sum(float(suite.get('time', 0)) for suite in root):.3f}")
    ElementTree.ElementTree(root).write(out, encoding="utf-8", xml_declaration=True)


def first_line(element: ElementTree.Element, default: str = "") -> str:
    """The first line of a <failure>/<error>/<skipped> element's message."""
    lines = (element.get("message") or "").strip().splitlines()
    return lines[0][:200] if lines else default


def print_results(reports: list[Path], log_dir: Path) -> None:
    # (An interrupted pytest writes its interrupted test as a <testcase> with no name: not a result.)
    cases = [case for report in reports for suite in read_suites(report) for case in suite.iter("testcase")
             if case.get("name")]
    missing = [report.name for report in reports if not read_suites(report)]
    failed = [(case, problem) for case in cases for problem in case if problem.tag in ("failure", "error")]
    skips = [skip for case in cases for skip in case if skip.tag == "skipped"]
    print(f"\npytest_shards: {len(cases)} tests: {len(cases) - len(failed) - len(skips)} passed, "
          f"{len(failed)} failed or errors, {len(skips)} skipped")
    if missing:
        print(f"pytest_shards: no readable JUnit report from {', '.join(missing)} (see {log_dir})")
    for case, problem in failed:
        message = first_line(problem)
        print(f"  {problem.tag.upper()} {case.get('classname')}::{case.get('name')}{': ' + message if message else ''}")
    for reason, count in Counter(first_line(skip, "(no reason given)") for skip in skips).most_common():
        print(f"  skipped {count}: {reason}")
    slowest = [case for case in sorted(cases, key=lambda case: float(case.get("time", 0)), reverse=True)[:10]
               if float(case.get("time", 0)) >= 0.01]
    if slowest:
        print("slowest tests (s):")
        for case in slowest:
            print(f"  {float(case.get('time', 0)):8.2f}  {case.get('classname')}::{case.get('name')}")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s [--shards N] --junitxml PATH [--grace S] -- PYTEST_ARGS...")
    parser.add_argument("--shards", type=int, default=default_shards(),
                        help="pytest processes to run at once (default: half the cores, 1 to 8)")
    parser.add_argument("--junitxml", type=Path, required=True, help="the merged JUnit report")
    parser.add_argument("--grace", type=float, default=8.0,
                        help="seconds a shard has to stop after SIGINT before it is killed (default 8)")
    parser.add_argument("pytest_args", nargs=argparse.REMAINDER, help="arguments for every pytest process")
    args = parser.parse_args(argv)
    if args.shards < 1:
        parser.error(f"--shards must be at least 1, got {args.shards}")
    pytest_args = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args
    if any(arg.startswith("--junitxml") or arg.startswith("--shard") for arg in pytest_args):
        parser.error("--junitxml and --shard are set per shard; give --junitxml before the --")
    return run_shards(pytest_args, args.shards, args.junitxml.resolve(), args.grace)


if __name__ == "__main__":
    sys.exit(main())
