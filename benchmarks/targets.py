#!/usr/bin/env python
"""The GPU suite's results against the benchmark targets, as one markdown table.

    python benchmarks/targets.py RESULTS_DIR      # reads bench.json, compiled.json, bench_kernels.json there

The targets (docs/benchmarks.md):
    step time      compress(bits=4) less than 10% slower than exact training, bf16 workloads; also for the
                   step captured in a CUDA graph, against exact training captured the same way, and for
                   the model under torch.compile with its packing traced (bench_compiled.py), against
                   exact training compiled the same way
    activations    compress(bits=2) keeps less than 1/7 of exact's activation memory in bf16, 1/14 in fp32
    peak           compress's peak clearly below torch.utils.checkpoint's at the same batch; "clearly" is
                   read here as at most 0.90x, and the ratio is printed either way
    bandwidth      the Triton kernels at 85% or more of the copy bandwidth for inputs of 256 MiB and up

Every figure is a ratio of two measurements of the same run. A row whose measurement is missing (a stage
that failed or ran out of time, an out-of-memory cell, a batch bench.json lists as planned but never
reached) says so instead of a verdict. The suite appends this table to its summary.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

STEP_OVERHEAD_MAX = 0.10
ACTIVATION_MAX = {"bf16": 1 / 7, "fp32": 1 / 14}
PEAK_VS_CHECKPOINT_MAX = 0.90
COPY_FRACTION_MIN = 0.85
LARGE_INPUT_BYTES = 256 << 20
BANDWIDTH_LABEL = f"bandwidth: {COPY_FRACTION_MIN:.0%} of copy, {LARGE_INPUT_BYTES >> 20} MiB and up"


def load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def verdict(met: bool) -> str:
    return "yes" if met else "no"


def bench_rows(bench: dict | None) -> list[list[str]]:
    """Rows for the step-time, activation and peak targets from ``bench.json``'s rows, for each of its
    planned cells (where it lists them) and each cell it measured."""
    if bench is None:
        return [["step time, activations, peak", "-", "bench.json missing or unreadable", "-"]]
    if not bench.get("gpu", True):
        return [["step time, activations, peak", "-", "bench.json is from a CPU run: no GPU figures", "-"]]
    cells = {(r["workload"], r["batch"], r["method"]): r for r in bench["rows"]}
    # The cells the run set out to measure ("planned", written by bench since it measures every workload's
    # smallest batch first), so that one it never reached reads "not measured" instead of being left out;
    # then any measured cell it does not list (older files have no "planned": their measured cells only).
    planned = bench.get("planned")
    measured_cells = [(r["workload"], r["batch"]) for r in bench["rows"]]
    rows = []
    for workload, batch in dict.fromkeys([*(tuple(cell) for cell in planned or ()), *measured_cells]):
        precision = "fp32" if "fp32" in workload else "bf16"
        name = f"{workload}, batch {batch}"

        def measured(method: str, key: str) -> float | None:
            cell = cells.get((workload, batch, method))
            return None if cell is None or cell.get("error") else cell.get(key)

        if precision == "bf16":
            # Eager steps, and steps captured in a CUDA graph (each against exact training run the same
            # way): a replay runs no Python, so there the overhead is the GPU's alone.
            for suffix, label in (("", f"step time, 4 bits: under +{STEP_OVERHEAD_MAX:.0%}"),
                                  ("+graph", f"step time, 4 bits, CUDA graph: under +{STEP_OVERHEAD_MAX:.0%}")):
                exact_ms, tq_ms = measured("exact" + suffix, "step_ms"), measured("tq-4bit" + suffix, "step_ms")
                if exact_ms and tq_ms:
                    overhead = tq_ms / exact_ms - 1
                    rows.append([label, name, f"{overhead:+.1%} ({tq_ms:.2f} vs {exact_ms:.2f} ms)",
                                 verdict(overhead < STEP_OVERHEAD_MAX)])
                # (A file without "planned" may be from before the bench captured steps: no such row then.)
                elif suffix == "" or planned is not None or (workload, batch, "exact" + suffix) in cells:
                    rows.append([label, name, "not measured", "-"])

        exact_act, tq_act = measured("exact", "activation_mb"), measured("tq-2bit", "activation_mb")
        limit = ACTIVATION_MAX[precision]
        label = f"activations, 2 bits: below 1/{round(1 / limit)} of exact"
        if exact_act and tq_act:
            accounted = measured("tq-2bit", "accounted_mb")
            note = "" if accounted is None else f"; {accounted:.0f} MB by the session's count"
            rows.append([label, name, f"1/{exact_act / tq_act:.3f} ({tq_act:.0f} vs {exact_act:.0f} MB{note})",
                         verdict(tq_act < limit * exact_act)])
        else:
            rows.append([label, name, "not measured", "-"])

        def peak_phase(method: str) -> str | None:
            """"forward" or "backward": the pass the method's step peaked in (None: not recorded)."""
            forward_peak, peak = measured(method, "forward_peak_mb"), measured(method, "peak_mb")
            return None if forward_peak is None or peak is None else ("forward" if forward_peak >= peak else "backward")

        checkpoint_peak = measured("checkpoint", "peak_mb")
        for method in ("tq-4bit", "tq-2bit"):
            peak = measured(method, "peak_mb")
            label = f"peak, {method[3:-3]} bits: at most {PEAK_VS_CHECKPOINT_MAX:.2f}x checkpointing's"
            if checkpoint_peak and peak:
                ratio = peak / checkpoint_peak
                phases = peak_phase(method), peak_phase("checkpoint")
                where = "" if None in phases else f"; peaks in {phases[0]} / {phases[1]}"
                rows.append([label, name, f"{ratio:.3f}x ({peak:.0f} vs {checkpoint_peak:.0f} MB{where})",
                             verdict(ratio <= PEAK_VS_CHECKPOINT_MAX)])
            else:
                rows.append([label, name, "not measured", "-"])
    return rows


def compiled_rows(compiled: dict | None) -> list[list[str]]:
    """Step-time rows from ``compiled.json`` (benchmarks/bench_compiled.py) for its target workloads: the
    model compiled whole, compress's packing traced into its graphs, against exact training compiled."""
    label = f"step time, 4 bits, torch.compile: under +{STEP_OVERHEAD_MAX:.0%}"
    if compiled is None:
        return [[label, "-", "compiled.json missing or unreadable", "-"]]
    if not compiled.get("gpu"):
        return [[label, "-", "compiled.json is from a CPU run: no GPU figures", "-"]]
    graphed_label = f"step time, 4 bits, torch.compile with CUDA graphs: under +{STEP_OVERHEAD_MAX:.0%}"
    cells = {(r["workload"], r["method"]): r for r in compiled["rows"] if r.get("error") is None}
    # The target workloads and methods the run set out to measure ("planned"), so that one it never reached
    # (a stage cut short by the suite's time limit) reads "not measured" instead of being left out. Older
    # files have no "planned": their measured target workloads and methods only.
    planned = compiled.get("planned")
    if planned is None:
        target_workloads = dict.fromkeys(r["workload"] for r in compiled["rows"] if r.get("target"))
        planned = [{"workload": workload,
                    "methods": [r["method"] for r in compiled["rows"] if r["workload"] == workload]}
                   for workload in target_workloads]
    rows = []
    for entry in planned:
        workload, methods = entry["workload"], entry["methods"]
        for row_label, exact_method, packed_method in (
                (label, "exact", "tq-4bit traced"),
                (graphed_label, "exact, CUDA graphs", "tq-4bit traced, CUDA graphs")):
            if packed_method not in methods:
                continue  # (CUDA graphs are measured on some workloads only)
            exact, packed = cells.get((workload, exact_method)), cells.get((workload, packed_method))
            if exact and packed:
                overhead = packed["step_ms"] / exact["step_ms"] - 1
                rows.append([row_label, workload,
                             f"{overhead:+.1%} ({packed['step_ms']:.2f} vs {exact['step_ms']:.2f} ms)",
                             verdict(overhead < STEP_OVERHEAD_MAX)])
            else:
                rows.append([row_label, workload, "not measured", "-"])
    return rows


def kernel_rows(kernels: dict | None) -> list[list[str]]:
    """Rows for the bandwidth target from ``bench_kernels.json``: every row of 256 MiB or more."""
    if kernels is None or kernels.get("meta", {}).get("device") != "cuda":
        return [[BANDWIDTH_LABEL, "-", "no GPU bench_kernels.json", "-"]]
    rows = []
    for r in kernels["rows"]:
        if r["input_bytes"] < LARGE_INPUT_BYTES:
            continue
        # (Results written before rows carried their label: "standardized" was a flag then.)
        kind = r.get("label") or r["kind"] + (", standardized" if r.get("standardized") else "")
        name = f"{kind} {r['dtype']} {r['bits']}-bit, {r['input_bytes'] >> 20} MiB"
        if "triton_frac" in r:
            rows.append([BANDWIDTH_LABEL, name,
                         f"{r['triton_frac']:.1%} ({r['triton_gbps']:.0f} GB/s)",
                         verdict(r["triton_frac"] >= COPY_FRACTION_MIN)])
        else:
            rows.append([BANDWIDTH_LABEL, name, r.get("triton_error") or "not measured", "-"])
    return rows


def targets_table(results: Path) -> str:
    """The markdown table (with its heading) for the results folder ``results``."""
    rows = (bench_rows(load(results / "bench.json")) + compiled_rows(load(results / "compiled.json"))
            + kernel_rows(load(results / "bench_kernels.json")))
    lines = ["## Against the targets", "", "| target | where | measured | met? |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    print(targets_table(Path(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
