"""``python -m tritonquant tune``: the CPU message, the progress/table output, caching and exit codes.

The GPU case is simulated on CPU by replacing ``autotune.tune`` (the timing itself is covered in
tests/kernels/test_autotune.py); a ``gpu`` test runs a real, tiny tuning.
"""

import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tritonquant import cli
from tritonquant.kernels import autotune
from tritonquant.kernels.autotune import CacheEntry, LaunchConfig, TuneResult
from tritonquant.tune import plan_items, run_tune

REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("isolated_cache")  # tests/conftest.py


@pytest.mark.cpu_only
def test_tune_on_cpu_says_it_needs_a_gpu_and_exits_0(isolated_cache):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", **{autotune.ENV_CACHE_DIR: str(isolated_cache)})
    proc = subprocess.run([sys.executable, "-m", "tritonquant", "tune"], env=env, capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "Autotuning needs a CUDA GPU" in proc.stdout
    assert "Nothing was tuned" in proc.stdout
    # The single interpreter config for the default group size: 65536-element tiles, 8 warps.
    assert "|     256 |    256 |       8 |              65536 |" in proc.stdout
    assert not isolated_cache.exists(), "nothing is written without a GPU"


def test_invalid_choices_exit_2():
    out = io.StringIO()
    assert run_tune(bits=(3,), stream=out) == 2
    assert "invalid bits [3]" in out.getvalue()
    assert run_tune(buckets=(20,), stream=io.StringIO()) == 2
    with pytest.raises(SystemExit) as exited:
        cli.main(["tune", "--bits", "four"])
    assert exited.value.code == 2


def test_plan_covers_the_requested_grid_in_order():
    items = plan_items(bits=(4, 2), group_sizes=(256,), dtypes=("bf16", "fp32"), buckets=(9, 10),
                       schemes=("minmax", "sigma"), stochastic=True)
    assert len(items) == 2 * 2 * 2 * (2 * 2 + 1)
    assert items[0].bits == 4 and items[-1].bits == 2
    assert {i.kind for i in items} == {"quantize", "dequantize"}
    assert all(i.scheme == "-" and not i.stochastic for i in items if i.kind == "dequantize")


class FakeTuner:
    """Replaces autotune.tune on a pretend GPU: config depends on the item, some items can fail."""

    def __init__(self, fail_bits=()):
        self.keys = []
        self.fail_bits = fail_bits

    def __call__(self, key, device, timer=None, candidates=None):
        self.keys.append(key)
        if key.bits in self.fail_bits:
            raise RuntimeError("simulated failure")
        tiles = 4 if key.kind == "quantize" and key.bits == 2 else 1  # (a pipelined config)
        config = LaunchConfig(2 ** (key.bits % 5), 4, tiles)
        one_tile = LaunchConfig(64, 8)  # (the fastest of one tile a program: slower)
        timings = {config: 0.01 * key.bits, one_tile: 0.0375 * key.bits, LaunchConfig(128, 8): float("inf")}
        return TuneResult(key, CacheEntry(config, 0.01 * key.bits, 0.02 * key.bits), "tuned", timings)


@pytest.fixture
def pretend_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(autotune, "device_identity", lambda device: ("NVIDIA H200", (9, 0)))
    monkeypatch.setattr(autotune, "is_interpreted", lambda: False)
    tuner = FakeTuner()
    monkeypatch.setattr(autotune, "tune", tuner)
    return tuner


def test_tune_prints_progress_and_a_table_then_reuses_the_cache(pretend_gpu, isolated_cache):
    options = dict(bits=(4, 2), group_sizes=(256,), dtypes=("bf16", "fp32"), buckets=(9, 11))
    n_items = len(plan_items(**options))
    out = io.StringIO()
    assert run_tune(**options, stream=out) == 0
    text = out.getvalue()
    assert "Tuning 16 launch configurations on NVIDIA H200 (sm_90)" in text
    progress = [line for line in text.splitlines() if line.startswith("[")]
    assert len(progress) == n_items
    assert progress[0].startswith(f"[ 1/{n_items} 0:00] quantize minmax 4-bit g256 bf16 4^9=262,144 el")
    assert "rows 16, 4 warps, 0.04 ms (heuristic 0.08 ms) [tuned]" in progress[0]
    pipelined = [line for line in progress if "quantize minmax 2-bit" in line]
    assert pipelined and all("rows 4, 4 warps, 4 tiles a program, 0.02 ms" in line for line in pipelined)
    # The table: rows, warps, tiles, the elements a program takes (4 x 4 x 256), ms, and the fastest
    # config of one tile a program, for quantize (at 4 bits the winner itself).
    assert re.search(r"\| +4 \| +4 \| +4 \| +4096 \| +0\.02 +\| +0\.075 +\|", text)
    assert re.search(r"\| quantize .*\| +16 \| +4 \| +1 \| +4096 \| +0\.04 +\| +0\.04 +\|", text)
    assert re.search(r"\| dequantize .*\| +16 \| +4 \| +1 \| +4096 \| +0\.04 +\| +\|", text)
    assert "| kind " in text and "vs heuristic" in text and "2.00x" in text
    assert f"{n_items} of {n_items} configurations tuned or cached, 0 failed, 0 skipped" in text
    assert len(pretend_gpu.keys) == n_items
    assert len(autotune.read_cache()) == n_items, "every tuned item is persisted"

    autotune.reset()  # a new process: everything comes from the file
    out = io.StringIO()
    assert run_tune(**options, stream=out) == 0
    assert len(pretend_gpu.keys) == n_items, "cached items are not retuned"
    assert out.getvalue().count("[cached]") == n_items

    assert run_tune(**options, force=True, stream=io.StringIO()) == 0
    assert len(pretend_gpu.keys) == 2 * n_items, "--force retunes"


def test_tune_failure_exits_1_and_budget_skips(pretend_gpu):
    pretend_gpu.fail_bits = (2,)
    out = io.StringIO()
    with pytest.warns(RuntimeWarning):
        code = run_tune(bits=(4, 2), dtypes=("bf16",), buckets=(9,), stream=out)
    assert code == 1
    assert "[failed] RuntimeError: simulated failure" in out.getvalue()

    autotune.reset()
    out = io.StringIO()
    assert run_tune(bits=(8,), dtypes=("fp16",), buckets=(9,), max_seconds=0.0, stream=out) == 0
    assert out.getvalue().count("skipped (time budget)") == 2
    assert "0 of 2 configurations tuned or cached, 0 failed, 2 skipped" in out.getvalue()


def test_cli_dispatches_tune(pretend_gpu, capsys):
    assert cli.main(["tune", "--bits", "8", "--dtypes", "fp16", "--buckets", "10", "--schemes", "minmax,sigma",
                     "--stochastic"]) == 0
    text = capsys.readouterr().out
    assert "quantize sigma+stochastic 8-bit g256 fp16" in text
    assert len(pretend_gpu.keys) == 5  # minmax, minmax+stochastic, sigma, sigma+stochastic, dequantize
    assert {(k.sigma, k.stochastic) for k in pretend_gpu.keys if k.kind == "quantize"} == {
        (False, False), (False, True), (True, False), (True, True)}


@pytest.mark.gpu
def test_real_tune_of_one_small_item(isolated_cache):
    out = io.StringIO()
    assert run_tune(bits=(4,), dtypes=("bf16",), buckets=(autotune.MIN_TUNED_BUCKET,), stream=out) == 0
    assert out.getvalue().count("[tuned]") == 2, out.getvalue()
    assert len(autotune.read_cache()) == 2


# ---------------------------------------------------------------------------------------------
# benchmarks/bench_kernels.py and benchmarks/gpu_suite.sh
# ---------------------------------------------------------------------------------------------


def clean_env(**extra):
    """This process's environment without PYTHONPATH (a suite shim must not leak into a simulation)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(extra)
    return env


@pytest.mark.cpu_only
def test_bench_kernels_cpu_run_writes_markdown_and_json(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_kernels.py"), "--quick", "--device", "cpu"],
                          env=dict(os.environ, OUT=str(out)), capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "CPU figures" in proc.stdout and "far too slow to time meaningfully" in proc.stdout
    markdown = (out / "bench_kernels.md").read_text()
    assert markdown.startswith("# Kernel roofline (CPU figures)")
    assert "| kind " in markdown and "torch GB/s" in markdown and "triton GB/s" not in markdown
    report = json.loads((out / "bench_kernels.json").read_text())
    meta, rows = report["meta"], report["rows"]
    assert meta["device"] == "cpu" and meta["gpu"] is None and meta["copy_gbps"] > 0
    for field in ("torch", "triton", "python", "date"):
        assert meta[field]
    assert {(r["kind"], r["dtype"], r["bits"]) for r in rows} == {
        (k, d, b) for k in ("quantize", "dequantize") for d in ("bf16", "fp32") for b in (2, 4, 8)}
    for row in rows:
        assert row["torch_gbps"] > 0 and row["torch_frac"] == pytest.approx(row["torch_gbps"] / meta["copy_gbps"])
        assert row["triton_error"] == "not run on CPU"


def test_gpu_suite_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu_suite.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# The stages a plain `bash benchmarks/gpu_suite.sh` leaves out: longer than all the others together.
OPT_IN_STAGES = ("compiled", "tests")


def test_gpu_suite_stages_all_in_order_and_by_default_all_but_the_long_ones():
    # A stage added to the script but to neither list would never run, and "all" must mean all of them.
    script = (REPO / "benchmarks" / "gpu_suite.sh").read_text()
    defined = re.findall(r"^run_stage ([a-z-]+) ", script, flags=re.MULTILINE)
    every = re.search(r'^ALL_STAGES="([a-z,-]+)"', script, flags=re.MULTILINE).group(1).split(",")
    default = re.search(r'^DEFAULT_STAGES="([a-z,-]+)"', script, flags=re.MULTILINE).group(1).split(",")
    assert len(defined) >= 9 and len(set(defined)) == len(defined)
    assert every == defined
    assert default == [stage for stage in defined if stage not in OPT_IN_STAGES]
    assert re.search(r'^STAGES="\$\{SUITE_STAGES:-\$DEFAULT_STAGES\}"', script, flags=re.MULTILINE)
    # The header's stage table lists the same stages in the same order, the opt-in ones marked.
    header = script.split("\n# Stages", 1)[1].split("\n# Written to", 1)[0]
    listed = re.findall(r"^#   ([a-z-]+) +\S", header, flags=re.MULTILINE)
    assert listed == defined
    marked = re.findall(r"^#   ([a-z-]+) +.*\(not by default\)", header, flags=re.MULTILINE)
    assert tuple(marked) == OPT_IN_STAGES


def test_gpu_suite_all_selects_every_stage(tmp_path):
    # With no budget left every selected stage is recorded as skipped, without running it.
    results = tmp_path / "results"
    env = clean_env(OUT=str(results), PYTHON=sys.executable, SUITE_STAGES="all", SUITE_BUDGET_S="1",
                    SUITE_FORCE_SHIM="1")
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # (a skipped stage did not pass)
    summary = json.loads((results / "summary.json").read_text())
    script = (REPO / "benchmarks" / "gpu_suite.sh").read_text()
    defined = re.findall(r"^run_stage ([a-z-]+) ", script, flags=re.MULTILINE)
    assert [(s["stage"], s["status"]) for s in summary["stages"]] == [(stage, "SKIPPED") for stage in defined]
    assert summary["not_selected"] == []
    assert "Not selected" not in (results / "summary.md").read_text()


def test_gpu_suite_gives_every_stage_a_longer_budget_unless_told(tmp_path):
    # Every stage takes about 14 minutes on an H200: the default stages' 465 s would skip the last ones.
    for budget, expected in ((None, "960s"), ("300", "300s")):
        results = tmp_path / f"results-{budget}"
        env = clean_env(OUT=str(results), PYTHON=sys.executable, SUITE_STAGES="all", SUITE_FORCE_SHIM="1")
        env.pop("SUITE_BUDGET_S", None)
        if budget is not None:
            env["SUITE_BUDGET_S"] = budget
        proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--setup-only"], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"stages: tests-gpu,demo,tune,kernels,pool,activation,host,bench,offload,checkpoint,compiled,tests; " \
               f"budget {expected}" in (results / "logs" / "suite.log").read_text()


def test_gpu_suite_refuses_an_unknown_stage_by_name(tmp_path):
    env = clean_env(OUT=str(tmp_path / "results"), SUITE_STAGES="bench,compiles")
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "unknown stage 'compiles'" in proc.stderr and "tests-gpu,demo,tune" in proc.stderr
    assert not (tmp_path / "results").exists(), "nothing is run or written"


def suite_stage_argv(stage: str) -> list[str]:
    """The command gpu_suite.sh runs for ``stage``, as an argument list (its first line only)."""
    script = (REPO / "benchmarks" / "gpu_suite.sh").read_text()
    line = re.search(rf"^run_stage {stage} \d+ (.*)$", script, flags=re.MULTILINE).group(1)
    return shlex.split(line.rstrip("\\"))


def test_gpu_suite_demo_stage_does_not_autotune():
    # On a GPU the demo's codec table would tune 12 keys (some 56 s of compiles): past its 60 s timeout.
    assert suite_stage_argv("demo")[:4] == ["env", "TRITONQUANT_AUTOTUNE=0", "$PY", "-m"]


def test_gpu_suite_tune_stage_tunes_what_the_measurements_use_in_their_order():
    argv = suite_stage_argv("tune")
    assert argv[:4] == ["$PY", "-m", "tritonquant", "tune"]
    args = cli.build_parser().parse_args([a.replace("@BUDGET@", "30") for a in argv[3:]])
    assert args.dtypes == ("bf16", "fp32") and args.bits == (4, 2, 8) and args.max_seconds == 30


def make_python_without_tritonquant(root: Path) -> Path:
    """A venv that sees this interpreter's packages (torch, triton, tabulate) as plain paths, so no
    installed tritonquant (an editable install's .pth finder) comes along: as on the GPU machine."""
    venv = root / "venv"
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True,
                       timeout=120)
    except (subprocess.CalledProcessError, OSError) as exc:
        pytest.skip(f"cannot create a venv here: {exc}")
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    packages = [p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages")) and os.path.isdir(p)]
    Path(purelib, "parent_packages.pth").write_text("\n".join(packages) + "\n")
    return python


@pytest.mark.cpu_only
def test_gpu_suite_shim_stages_and_summary(tmp_path):
    python = make_python_without_tritonquant(tmp_path)
    env = clean_env(PYTHON=str(python), CUDA_VISIBLE_DEVICES="")
    check = subprocess.run([str(python), "-c", "import torch, triton, tabulate; import tritonquant.kernels"],
                           env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "No module named 'torch'" not in check.stderr, "the simulated interpreter must see torch"
    assert check.returncode != 0, "without the shim, tritonquant.kernels must not import from a bare checkout"

    results = tmp_path / "results"
    env.update(OUT=str(results), SUITE_FORCE_SHIM="1", SUITE_STAGES="tests-gpu,tune",
               SUITE_TIMEOUT_TESTS_GPU="0.01")  # a stage that times out, then one that must still run
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # one stage failed
    summary = json.loads((results / "summary.json").read_text())
    assert summary["import_mode"].startswith("shim")
    assert [(s["stage"], s["status"]) for s in summary["stages"]] == [("tests-gpu", "TIMEOUT"), ("tune", "PASS")]
    left_out = ["demo", "kernels", "pool", "activation", "host", "bench", "offload", "checkpoint", "compiled", "tests"]
    assert summary["not_selected"] == left_out
    # `python -m tritonquant tune` ran from the repo root, where the bare ./tritonquant folder shadows
    # everything but the shim's finder.
    assert "Autotuning needs a CUDA GPU" in (results / "logs" / "tune.log").read_text()
    summary_md = (results / "summary.md").read_text()
    assert "| tune | PASS |" in summary_md
    assert f"Not selected: {', '.join(left_out)} (`SUITE_STAGES=all` runs every stage)." in summary_md
    assert "--max-seconds @BUDGET@" not in summary_md and re.search(r"tune [^`]*--max-seconds \d", summary_md)
    # The targets table reads what the stages wrote; here no bench or kernels stage ran.
    assert "## Against the targets" in summary_md and "bench.json missing or unreadable" in summary_md
    environment = json.loads((results / "env.json").read_text())
    for field in ("gpu", "driver", "torch", "triton", "python", "date"):
        assert field in environment
    assert environment["torch"] == torch.__version__
    shim_dir = Path(summary["import_mode"].split("(", 1)[1].split(" on PYTHONPATH")[0])
    assert shim_dir.name.startswith("tritonquant-shim.") and not shim_dir.exists(), "the shim is removed at the end"
