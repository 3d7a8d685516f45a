"""Convergence sweep: exact vs compressed training on real data, several seeds (tritonquant.fidelity).

    python benchmarks/fidelity.py                     # full sweep, CPU, tens of minutes
    python benchmarks/fidelity.py --quick             # 1 seed, short runs: a smoke test
    python benchmarks/fidelity.py --configs exact tq4-minmax-nearest --seeds 0 1

Results go to a JSON-lines file (one run a line; reruns skip what is there), then a markdown table
(mean +/- std of the final held-out metric per configuration) and PNG curves in --out (default docs/).
Needs the ``fidelity`` extra: pip install -e ".[fidelity]".
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from tabulate import tabulate
from torch import nn

from tritonquant.fidelity import TASKS, MeasuredAuto, compress_context, train_run

NORMS = {nn.BatchNorm2d: {"bits": 8}, nn.LayerNorm: {"bits": 8}, nn.RMSNorm: {"bits": 8}}
METRIC_NAMES = {"digits": "held-out accuracy", "stdlib-lm": "held-out loss (nats/char)",
                "stdlib-lm-fused": "held-out loss (nats/char)", "stdlib-words": "held-out loss (nats/token)"}


def configurations() -> dict:
    """label -> context factory (None: exact training).

    The tq* and auto-* configurations use uniform widths everywhere (sensitive_bits=1); measured-* is
    bits="auto" with its plan from ``tq.calibrate`` (re-measured every 50 steps, no floor); "default" is
    ``tq.compress()`` as shipped (4 bits; below 4 bits, softmax and log_softmax outputs keep 4), and
    "+sensitiveB" floors those at B bits.
    """
    uniform = {"sensitive_bits": 1}
    configs = {"exact": None}
    for bits in (8, 4, 2):
        for scheme in ("minmax", "sigma"):
            for rounding in ("nearest", "stochastic"):
                configs[f"tq{bits}-{scheme}-{rounding}"] = compress_context(
                    bits=bits, scheme=scheme, stochastic=rounding == "stochastic", **uniform)
    for bits in (4, 2):
        configs[f"tq{bits}-minmax-nearest+norm8"] = compress_context(bits=bits, overrides=NORMS, **uniform)
    configs["auto-2.0"] = compress_context(bits="auto", budget=2.0, **uniform)
    configs["auto-3.0"] = compress_context(bits="auto", budget=3.0, **uniform)
    for budget in (2.0, 3.0):  # plans measured by tq.calibrate at step 1 and every 50 steps
        configs[f"measured-{budget}"] = MeasuredAuto(budget, 50, dict(uniform))
    configs["default"] = compress_context()
    # The default as it was before GELU/SiLU outputs were computed again in backward (packed instead).
    configs["default-packed-activations"] = compress_context(recompute_activations=False)
    for floor in (8, 4):
        configs[f"tq4+sensitive{floor}"] = compress_context(bits=4, sensitive_bits=floor)
        configs[f"tq2+sensitive{floor}"] = compress_context(bits=2, sensitive_bits=floor)
        for budget in (2.0, 3.0):
            configs[f"auto-{budget}+sensitive{floor}"] = compress_context(bits="auto", budget=budget,
                                                                          sensitive_bits=floor)
            configs[f"measured-{budget}+sensitive{floor}"] = MeasuredAuto(budget, 50, {"sensitive_bits": floor})
    # Probabilities on the plain grid at 2 bits or more: the floor takes less of a 2-bit budget.
    configs["measured-2.0+sensitive2"] = MeasuredAuto(2.0, 50, {"sensitive_bits": 2})
    # The default at larger groups: half or a quarter of the metadata, and of the kernels' per-group work.
    for group_size in (512, 1024):
        configs[f"default-g{group_size}"] = compress_context(group_size=group_size)
    return configs


def summarize(rows: list[dict], tasks: list[str]) -> str:
    out = []
    for task in tasks:
        runs = [r for r in rows if r["task"] == task]
        if not runs:
            continue
        metric = METRIC_NAMES[task]
        exact = [r["final"] for r in runs if r["label"] == "exact"]
        table = []
        for label in dict.fromkeys(r["label"] for r in runs):
            finals = [r["final"] for r in runs if r["label"] == label]
            spread = statistics.stdev(finals) if len(finals) > 1 else 0.0
            gap = statistics.mean(finals) - statistics.mean(exact) if exact else float("nan")
            ratio = statistics.mean(r["packed_ratio"] for r in runs if r["label"] == label)
            table.append([label, len(finals), f"{statistics.mean(finals):.4f} +/- {spread:.4f}", f"{gap:+.4f}",
                          "-" if label == "exact" else f"{ratio:.2f}x"])
        out.append(f"### {task}: final {metric}\n\n" + tabulate(
            table, headers=["configuration", "seeds", "mean +/- std", "vs exact", "packed ratio"], tablefmt="github",
            disable_numparse=True))
    return "\n\n".join(out)


def plot(rows: list[dict], tasks: list[str], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plots")
        return
    for task in tasks:
        runs = [r for r in rows if r["task"] == task]
        if not runs:
            continue
        fig, ax = plt.subplots(figsize=(10, 5))
        labels = list(dict.fromkeys(r["label"] for r in runs))
        ax.set_prop_cycle(color=[plt.get_cmap("tab20")(i % 20) for i in range(len(labels))])
        for label in labels:
            group = [r for r in runs if r["label"] == label]
            steps = group[0]["steps"]
            mean = [statistics.mean(r["metric"][i] for r in group) for i in range(len(steps))]
            style = "-" if label == "exact" or "norm8" in label or label.startswith(("auto", "measured")) else "--"
            ax.plot(steps, mean, style, label=label, linewidth=2.5 if label == "exact" else 1.2)
        title = f"{task}: mean over seeds"
        exact = [r for r in runs if r["label"] == "exact"]
        if task != "digits" and exact:  # one diverging run must not flatten every other curve
            ceiling = max(max(r["metric"]) for r in exact) + 1.0
            if ax.get_ylim()[1] > ceiling:
                ax.set_ylim(top=ceiling)
                title += " (axis clipped at exact + 1 nat)"
        ax.set(xlabel="step", ylabel=METRIC_NAMES[task],
               title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: curves stay visible
        fig.tight_layout()
        fig.savefig(out / f"fidelity_{task}.png", dpi=110)
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--configs", nargs="+", default=None, help="labels to run (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="override each task's step count")
    parser.add_argument("--quick", action="store_true", help="1 seed, 60 steps, a few configurations")
    parser.add_argument("--results", default="benchmarks/results/fidelity.jsonl")
    parser.add_argument("--out", default="docs")
    args = parser.parse_args(argv)

    configs = configurations()
    labels = args.configs or list(configs)
    if args.quick:
        labels = args.configs or ["exact", "tq4-minmax-nearest", "tq2-minmax-nearest"]
        args.seeds, args.steps = [0], args.steps or 60
    unknown = sorted(set(labels) - set(configs))
    if unknown:
        parser.error(f"unknown configuration {unknown[0]!r}; choose from {', '.join(configs)}")
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    rows = []
    if results.exists():
        for line in results.read_text().splitlines():
            row = json.loads(line)
            rows.append(row)
            done.add((row["task"], row["label"], row["seed"], row["steps"][-1]))
    todo = [(t, l, s) for t in args.tasks for l in labels for s in args.seeds]
    started = time.perf_counter()
    for i, (task_name, label, seed) in enumerate(todo, 1):
        task = TASKS[task_name](**({"steps": args.steps} if args.steps else {}))
        if (task_name, label, seed, task.steps) in done:
            continue
        t0 = time.perf_counter()
        run = train_run(task, label, configs[label], seed, eval_every=max(task.steps // 10, 1))
        row = {"task": run.task, "label": run.label, "seed": run.seed, "steps": run.steps,
               "train_loss": run.train_loss, "metric": run.metric, "final": run.final,
               "packed_ratio": run.packed_ratio}
        rows.append(row)
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"[{i}/{len(todo)} {time.perf_counter() - started:6.0f}s] {task_name} {label} seed {seed}: "
              f"{run.final:.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    wanted = [r for r in rows if r["label"] in labels and r["seed"] in args.seeds and r["task"] in args.tasks]
    wanted.sort(key=lambda r: labels.index(r["label"]))  # tables and legends in the order asked for
    text = summarize(wanted, args.tasks)
    print("\n" + text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(wanted, args.tasks, out)
    (results.parent / "fidelity_summary.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
