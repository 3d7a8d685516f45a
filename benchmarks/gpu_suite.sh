#!/usr/bin/env bash
# Everything that needs a GPU, from a plain repo checkout; the default stages in under 8 minutes (H200):
#
#   bash benchmarks/gpu_suite.sh                  # results under $OUT, else benchmarks/results/<UTC date>/
#   SUITE_STAGES=all bash benchmarks/gpu_suite.sh # every stage (compiled and tests too), in about 14 minutes
#   SUITE_STAGES=bench,compiled bash ...          # the stages named, in the order below
#
# Stages, in the order they run (each time-bounded; a failing stage is recorded and the suite goes on).
# All but compiled and tests run by default: those two alone take longer than the rest together
# (H200, stage times of 2026-11-29 and -30: the default stages about 360 s; compiled 190-300 s of
# compiles; tests 180 s or more).
#   tests-gpu  pytest -q -m gpu (pytest_shards.py) the GPU-only tests (compiled kernels vs references first)
#   demo       python -m tritonquant demo          the main job, as a user runs it first (TRITONQUANT_AUTOTUNE=0)
#   tune       python -m tritonquant tune          autotune the launch configs the measurements use (bf16
#              and fp32 at 4, 2, 8 bits; bounded time)
#   kernels    benchmarks/bench_kernels.py --quick kernel GB/s vs the device copy bandwidth
#   pool       benchmarks/bench_pool_indices.py   max-pooling index kernels vs their torch references
#   activation benchmarks/bench_activation_decode.py  GELU/SiLU as their input is decoded vs decode + torch
#   host       benchmarks/profile_host.py          host cost per call and per saved tensor; one step profiled
#   bench      python -m tritonquant bench --out   training memory/step time vs exact, checkpointing, save_on_cpu
#   offload    benchmarks/bench_offload.py         offload="cpu" against save_on_cpu (peak memory, step time)
#   checkpoint benchmarks/bench_checkpoint.py      compress() combined with torch.utils.checkpoint
#   compiled   benchmarks/bench_compiled.py        (not by default) models under torch.compile: GPT-2 small and
#              ResNet-50, exact vs packing traced into their graphs, also replayed as CUDA graphs; an MLP
#              also with Python hooks and eager (step time, memory; 30-40 s of compilation per model and method)
#   tests      pytest -q -m "not slow and not gpu and not cpu_only" (pytest_shards.py)  (not by default) the
#              rest of the suite, real kernels, kernel tests last
# Written to the results folder: env.json/env.md (GPU, driver, torch, triton, python, date, commit),
# summary.md/summary.json (pass/fail/timeout per stage; summary.md also the results against the
# benchmark targets, benchmarks/targets.py), logs/<stage>.log, pytest junit XML (merged; each shard's
# log and report in pytest-gpu-shards/ and pytest-all-shards/),
# bench_kernels.md/json, pool_indices.md, activation_decode.md, compiled.md/json, bench.md/json, memory_vs_batch.png,
# step_time_vs_bits.png, profile_host.md, cprofile.txt,
# autotune-cache/ (the tuned configs).
#
# The GPU machine has no network: nothing is installed from an index. tritonquant is made importable
# from this checkout by, in order: an existing install of this checkout; an offline editable install
# (pip --no-index --no-deps --no-build-isolation); else a shim. The shim is needed because
# pyproject.toml maps the package `tritonquant.kernels` to the top-level folder `kernels/`, so
# PYTHONPATH=. alone gives `tritonquant` without `tritonquant.kernels`. The shim is a temporary folder
# on PYTHONPATH holding a sitecustomize.py that puts an import finder first on sys.meta_path (the same
# mapping a setuptools editable install uses), so it works in every Python process the suite starts,
# whatever its working directory, and then runs any sitecustomize it shadows.
#
# Environment knobs: PYTHON (interpreter), OUT (results folder), SUITE_BUDGET_S (whole suite, default
# 465 s, 960 s with SUITE_STAGES=all), SUITE_STAGES (comma-separated stage names, or "all"; default: all but compiled and tests; a name
# not listed above stops the suite with exit status 2), SUITE_TIMEOUT_<STAGE> (seconds for one stage,
# e.g. SUITE_TIMEOUT_TESTS=300), SUITE_SHARDS (pytest processes per test stage; default half the cores,
# at most 8), SUITE_FORCE_SHIM=1 (skip the install checks, use the shim).
# `--setup-only` stops after making the package importable and prints how (used by the tests).
# Exit status: 0 when every selected stage passed, 1 otherwise (2: an unknown stage name).

set -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STAMP="$(date -u +%Y-%m-%dT%H%M%SZ)"
RESULTS="${OUT:-$REPO/benchmarks/results/$STAMP}"
# The whole suite's time budget: under 8 minutes for the default stages; every stage takes about 14.
if [ -n "${SUITE_BUDGET_S:-}" ]; then BUDGET_S="$SUITE_BUDGET_S"
elif [ "${SUITE_STAGES:-}" = "all" ]; then BUDGET_S=960
else BUDGET_S=465; fi
ALL_STAGES="tests-gpu,demo,tune,kernels,pool,activation,host,bench,offload,checkpoint,compiled,tests"
DEFAULT_STAGES="tests-gpu,demo,tune,kernels,pool,activation,host,bench,offload,checkpoint"
STAGES="${SUITE_STAGES:-$DEFAULT_STAGES}"
[ "$STAGES" = "all" ] && STAGES="$ALL_STAGES"
for stage in ${STAGES//,/ }; do
    case ",$ALL_STAGES," in
        *",$stage,"*) ;;
        *) echo "gpu_suite: SUITE_STAGES names an unknown stage '$stage'; stages: $ALL_STAGES (or all)" >&2; exit 2 ;;
    esac
done
NOT_SELECTED=""  # the stages this run leaves out, named in its summary
for stage in ${ALL_STAGES//,/ }; do
    case ",$STAGES," in *",$stage,"*) ;; *) NOT_SELECTED="${NOT_SELECTED:+$NOT_SELECTED, }$stage" ;; esac
done
SETUP_ONLY=0
[ "${1:-}" = "--setup-only" ] && SETUP_ONLY=1
START_S=$(date +%s)

mkdir -p "$RESULTS/logs" || { echo "gpu_suite: cannot create $RESULTS" >&2; exit 1; }
RESULTS="$(cd "$RESULTS" && pwd)"
SUITE_LOG="$RESULTS/logs/suite.log"
: > "$SUITE_LOG"
SUMMARY_TSV="$RESULTS/logs/summary.tsv"
: > "$SUMMARY_TSV"

say() { echo "[gpu_suite $(date -u +%H:%M:%S)] $*" | tee -a "$SUITE_LOG"; }
json_escape() { printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g'; }

# ------------------------------------------------------------------------------------------------
# The interpreter: $PYTHON, else the first of python/python3 that imports torch and triton.
# ------------------------------------------------------------------------------------------------
PY=""
for candidate in "${PYTHON:-}" python python3; do
    [ -n "$candidate" ] || continue
    command -v "$candidate" > /dev/null 2>&1 || continue
    if "$candidate" -c "import torch, triton" > /dev/null 2>&1; then PY="$(command -v "$candidate")"; break; fi
done
if [ -z "$PY" ]; then
    say "no python with torch and triton found (set PYTHON)"; exit 1
fi
say "python: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])'))"
say "stages: $STAGES; budget ${BUDGET_S}s"

# ------------------------------------------------------------------------------------------------
# Make `import tritonquant` (with tritonquant.kernels) resolve to this checkout.
# ------------------------------------------------------------------------------------------------
check_import() {
    # Succeeds when tritonquant and tritonquant.kernels come from $REPO, both from the repo root (where
    # the bare ./tritonquant folder shadows installs) and from an unrelated folder.
    local where
    for where in "$REPO" /; do
        (cd "$where" && TQ_REPO="$REPO" "$PY" - <<'EOF'
import os, sys
import tritonquant, tritonquant.kernels, tritonquant.kernels.autotune
repo = os.path.realpath(os.environ["TQ_REPO"])
want = {tritonquant: os.path.join(repo, "tritonquant", "__init__.py"),
        tritonquant.kernels: os.path.join(repo, "kernels", "__init__.py")}
bad = [f"{m.__name__} from {m.__file__}" for m, path in want.items() if os.path.realpath(m.__file__) != path]
if bad:
    sys.exit("not this checkout: " + ", ".join(bad))
EOF
        ) >> "$SUITE_LOG" 2>&1 || return 1
    done
    return 0
}

make_shim() {
    SHIM_DIR="$(mktemp -d "${TMPDIR:-/tmp}/tritonquant-shim.XXXXXX")" || return 1
    local repo_literal  # the checkout's path as a Python string literal
    repo_literal="$("$PY" -c 'import sys; print(repr(sys.argv[1]))' "$REPO")" || return 1
    cat > "$SHIM_DIR/sitecustomize.py" <<EOF
# Written by benchmarks/gpu_suite.sh: import tritonquant from the checkout at $REPO, mapping
# tritonquant.kernels to its top-level kernels/ folder as pyproject.toml's package-dir does.
import importlib.util
import os
import sys

_REPO = $repo_literal
_ROOTS = {"tritonquant": os.path.join(_REPO, "tritonquant"), "tritonquant.kernels": os.path.join(_REPO, "kernels")}


class _TritonquantFinder:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        root = _ROOTS.get(name)
        if root is None:
            return None
        return importlib.util.spec_from_file_location(
            name, os.path.join(root, "__init__.py"), submodule_search_locations=[root])


sys.meta_path.insert(0, _TritonquantFinder)


def _run_shadowed_sitecustomize():
    # This file hides any other sitecustomize on sys.path; import that one too.
    here = os.path.dirname(os.path.realpath(__file__))
    saved_path, saved_module = list(sys.path), sys.modules.pop("sitecustomize", None)
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != here]
    try:
        import sitecustomize  # noqa: F401
    except ImportError:
        if saved_module is not None:
            sys.modules["sitecustomize"] = saved_module
    finally:
        sys.path[:] = saved_path


_run_shadowed_sitecustomize()
EOF
    export PYTHONPATH="$SHIM_DIR${PYTHONPATH:+:$PYTHONPATH}"
}

IMPORT_MODE=""
if [ "${SUITE_FORCE_SHIM:-0}" != "1" ] && check_import; then
    IMPORT_MODE="installed"
elif [ "${SUITE_FORCE_SHIM:-0}" != "1" ] && \
        timeout 120 "$PY" -m pip install --no-index --no-deps --no-build-isolation -q -e "$REPO" \
            >> "$SUITE_LOG" 2>&1 && check_import; then
    IMPORT_MODE="editable install (offline)"
elif make_shim && check_import; then
    IMPORT_MODE="shim ($SHIM_DIR on PYTHONPATH)"
else
    IMPORT_MODE="FAILED"
fi
say "tritonquant import: $IMPORT_MODE"
if [ "$IMPORT_MODE" = "FAILED" ]; then
    say "cannot import tritonquant from $REPO; the last error is in $SUITE_LOG (a missing dependency such as tabulate?)"
fi
if [ "$SETUP_ONLY" = "1" ]; then
    echo "IMPORT_MODE=$IMPORT_MODE"
    echo "PYTHONPATH=${PYTHONPATH:-}"
    [ "$IMPORT_MODE" != "FAILED" ]; exit $?
fi

# ------------------------------------------------------------------------------------------------
# Environment record
# ------------------------------------------------------------------------------------------------
export TRITONQUANT_CACHE_DIR="$RESULTS/autotune-cache"  # fresh tuning, kept with the results
command -v nvidia-smi > /dev/null 2>&1 && nvidia-smi > "$RESULTS/logs/nvidia-smi.txt" 2>&1
TQ_IMPORT_MODE="$IMPORT_MODE" TQ_REPO="$REPO" "$PY" - "$RESULTS" <<'EOF' >> "$SUITE_LOG" 2>&1
import datetime, importlib.metadata, importlib.util, json, os, platform, subprocess, sys

import torch, triton


def run(*cmd):
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=15, cwd=os.environ["TQ_REPO"])
        return proc.stdout.strip() if proc.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


env = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "python": platform.python_version(),
    "torch": torch.__version__,
    "triton": triton.__version__,
    "tabulate": importlib.metadata.version("tabulate") if importlib.util.find_spec("tabulate") else None,
    "cuda_runtime": torch.version.cuda,
    "cuda_available": torch.cuda.is_available(),
    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if torch.cuda.is_available() else None,
    "gpu_count": torch.cuda.device_count(),
    "driver": (run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader") or "").split("\n")[0] or None,
    "platform": platform.platform(),
    "commit": run("git", "rev-parse", "HEAD"),
    "dirty": bool(run("git", "status", "--porcelain")),
    "import_mode": os.environ["TQ_IMPORT_MODE"],
}
out = sys.argv[1]
with open(os.path.join(out, "env.json"), "w") as handle:
    json.dump(env, handle, indent=1)
with open(os.path.join(out, "env.md"), "w") as handle:
    handle.write("# Environment\n\n" + "".join(f"- {k}: {v}\n" for k, v in env.items()))
print(json.dumps(env))
EOF
[ -f "$RESULTS/env.json" ] && say "environment: $(tr -d '\n' < "$RESULTS/env.json")"

# ------------------------------------------------------------------------------------------------
# Stages
# ------------------------------------------------------------------------------------------------
selected() { case ",$STAGES," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

run_stage() {  # run_stage NAME NOMINAL_TIMEOUT_S COMMAND... (an argument @BUDGET@ becomes the time the
              # command should aim for: its timeout less 20 s for start-up and writing results)
    local name="$1" nominal="$2"; shift 2
    selected "$name" || return 0
    local override_var="SUITE_TIMEOUT_$(echo "$name" | tr 'a-z-' 'A-Z_')"
    local limit="${!override_var:-$nominal}"
    local left=$(( BUDGET_S - ($(date +%s) - START_S) - 5 ))
    local log="$RESULTS/logs/$name.log"
    if [ -z "${!override_var:-}" ]; then
        if [ "$left" -lt 20 ]; then
            say "stage $name: SKIPPED (suite budget of ${BUDGET_S}s spent)"
            printf '%s\tSKIPPED\t-\t0\t%s\t%s\n' "$name" "$limit" "$*" >> "$SUMMARY_TSV"
            return 0
        fi
        [ "$left" -lt "$limit" ] && limit="$left"
    fi
    local budget arg
    budget=$(awk -v l="$limit" 'BEGIN { b = l - 20; if (b < l / 2) b = l / 2; if (b < 1) b = 1; printf "%d", b }')
    local -a cmd=()
    for arg in "$@"; do
        if [ "$arg" = "@BUDGET@" ]; then cmd+=("$budget"); else cmd+=("$arg"); fi
    done
    set -- "${cmd[@]}"
    say "stage $name (timeout ${limit}s): $*"
    local t0; t0=$(date +%s)
    # SIGINT first: pytest then still writes its summary and JUnit report (which tests passed before the
    # limit), and Python stages stop as on Ctrl-C, their files written so far kept. KILL 10 s later.
    (cd "$REPO" && exec timeout --signal=INT --kill-after=10 "$limit" "$@") 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]}
    local seconds=$(( $(date +%s) - t0 ))
    local status="PASS"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="TIMEOUT"; elif [ "$rc" -ne 0 ]; then status="FAIL"; fi
    say "stage $name: $status (exit $rc, ${seconds}s)"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$seconds" "$limit" "$*" >> "$SUMMARY_TSV"
}

# Tests run with TRITONQUANT_AUTOTUNE=0: results do not depend on the tile, and tuning every
# (bits, dtype, scheme, size) the tests touch would cost minutes of compiles; the autotune tests set
# the variable themselves. The GPU conftest does not set TRITON_INTERPRET, so real kernels run.
# The whole-suite stage does not stop at its first failure: device time is scarce, and one run should
# show every test that fails with compiled kernels.
# Order: correctness on the GPU first (the GPU-only tests, including a compiled-vs-reference check),
# then the main job, then the measurements, then the whole suite: on a GPU each kernel specialization
# it uses compiles once, so if the budget runs out, the stage lost is the one a CPU run covers. Among
# the measurements the host profile (short, and what the step-time target needs explained) comes
# before the training benchmark, which writes its table after every batch and loses least to a late
# stop; the compiled models, minutes of compiles, come last, and like the whole suite after them only
# when selected (SUITE_STAGES). Both test stages run the integration tests first (CUDA graphs and
# offload only ever run on a GPU), then the API's, then the other folders, and the kernels' last: a
# CPU run checks those in the
# interpreter, and the whole suite's kernel tests alone compile some 800 variants, perhaps more than
# its budget even in shards. (pytest runs separate folders in the order given; every folder under tests/ is in.) The
# whole suite leaves out the GPU-only tests (their stage ran them) and the cpu_only ones.
TEST_DIRS=(tests/integration tests/tritonquant)
for dir in "$REPO"/tests/*/; do
    dir="tests/$(basename "$dir")"
    case " ${TEST_DIRS[*]} tests/kernels tests/__pycache__ " in *" $dir "*) ;; *) TEST_DIRS+=("$dir") ;; esac
done
TEST_DIRS+=(tests/kernels)
# Both test stages run as several pytest processes at once (benchmarks/pytest_shards.py): a test run on
# a GPU is mostly Triton compiling, one core per compile.
SHARDS=(${SUITE_SHARDS:+--shards "$SUITE_SHARDS"})
run_stage tests-gpu 180 env TRITONQUANT_AUTOTUNE=0 "$PY" benchmarks/pytest_shards.py "${SHARDS[@]}" \
    --junitxml "$RESULTS/pytest-gpu.xml" -- -q -m gpu -p no:cacheprovider "${TEST_DIRS[@]}"
# The main job, as a user on a GPU machine runs it first. Without autotuning: its codec table alone
# (an 800K-element tensor, bucket 10) would tune 12 keys of 9 candidates, about 56 s of compiles (more
# since quantize times 4 pipelined candidates too), past the stage's timeout; the demo checks that the
# job works, its speed is what tune, kernels and bench measure.
run_stage demo 60 env TRITONQUANT_AUTOTUNE=0 "$PY" -m tritonquant demo
# Only what the measurements use: bf16 and fp32 (no fp16), bits 4, 2, 8 (no 1), in the order the targets
# need them, so that a budget that runs out loses the least used.
run_stage tune 50 "$PY" -m tritonquant tune --dtypes bf16,fp32 --bits 4,2,8 --max-seconds @BUDGET@
run_stage kernels 90 "$PY" benchmarks/bench_kernels.py --quick --out "$RESULTS" --max-seconds @BUDGET@
run_stage pool 30 "$PY" benchmarks/bench_pool_indices.py --out "$RESULTS"
run_stage activation 30 "$PY" benchmarks/bench_activation_decode.py --out "$RESULTS"
run_stage host 60 "$PY" benchmarks/profile_host.py --out "$RESULTS"
run_stage bench 180 "$PY" -m tritonquant bench --steps 3 --out "$RESULTS" --plots "$RESULTS"
run_stage offload 40 "$PY" benchmarks/bench_offload.py --steps 3
run_stage checkpoint 30 "$PY" benchmarks/bench_checkpoint.py --steps 3
run_stage compiled 300 "$PY" benchmarks/bench_compiled.py --out "$RESULTS"
run_stage tests 180 env TRITONQUANT_AUTOTUNE=0 "$PY" benchmarks/pytest_shards.py "${SHARDS[@]}" \
    --junitxml "$RESULTS/pytest-all.xml" -- -q -m "not slow and not gpu and not cpu_only" -p no:cacheprovider \
    "${TEST_DIRS[@]}"

# ------------------------------------------------------------------------------------------------
# Summary
# ------------------------------------------------------------------------------------------------
TOTAL_S=$(( $(date +%s) - START_S ))
FAILED=0
{
    echo "# GPU suite summary"
    echo
    echo "Results: \`$RESULTS\`; total ${TOTAL_S}s (budget ${BUDGET_S}s); tritonquant import: $IMPORT_MODE."
    echo
    echo "| stage | status | exit | seconds | timeout | command |"
    echo "|---|---|---|---|---|---|"
    while IFS=$'\t' read -r name status rc seconds limit cmd; do
        echo "| $name | $status | $rc | $seconds | $limit | \`$cmd\` |"
    done < "$SUMMARY_TSV"
    if [ -n "$NOT_SELECTED" ]; then
        echo
        echo "Not selected: $NOT_SELECTED (\`SUITE_STAGES=all\` runs every stage)."
    fi
} > "$RESULTS/summary.md"
# The measurements against the benchmark targets (whatever the stages left behind to read).
{ echo; "$PY" "$REPO/benchmarks/targets.py" "$RESULTS"; } >> "$RESULTS/summary.md" 2>> "$SUITE_LOG"
{
    printf '{"results": "%s", "total_s": %s, "budget_s": %s, "import_mode": "%s", "not_selected": [%s], "stages": [' \
        "$(json_escape "$RESULTS")" "$TOTAL_S" "$BUDGET_S" "$(json_escape "$IMPORT_MODE")" \
        "$(echo "$NOT_SELECTED" | sed -E 's/([a-z-]+)/"\1"/g')"
    sep=""
    while IFS=$'\t' read -r name status rc seconds limit cmd; do
        printf '%s{"stage": "%s", "status": "%s", "exit": "%s", "seconds": %s, "timeout": "%s", "command": "%s"}' \
            "$sep" "$name" "$status" "$rc" "$seconds" "$limit" "$(json_escape "$cmd")"
        sep=", "
    done < "$SUMMARY_TSV"
    echo "]}"
} > "$RESULTS/summary.json"
while IFS=$'\t' read -r name status rc seconds limit cmd; do
    [ "$status" = "PASS" ] || FAILED=1
done < "$SUMMARY_TSV"
[ "$IMPORT_MODE" = "FAILED" ] && FAILED=1

echo
cat "$RESULTS/summary.md" | tee -a "$SUITE_LOG"
[ -n "${SHIM_DIR:-}" ] && rm -rf "$SHIM_DIR"
exit "$FAILED"
