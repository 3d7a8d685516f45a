"""The memory-savings table printed by ``session.report()`` and ``handle.report()``."""

from __future__ import annotations

from tabulate import tabulate

from .config import CompressConfig
from .policy import REASONS

MB = 2**20


def _ratio(raw: int, packed: int) -> str:
    return f"{raw / packed:.2f}x" if packed else "-"


def _widths(bits: set) -> str:
    """The code widths used, "2,4"; "-" for none."""
    return ",".join(str(b) for b in sorted(bits)) or "-"


def format_report(stats, config: CompressConfig, peak_memory: dict[int, int]) -> str:
    """One row per module that saved tensors (in the order they ran), then a totals row.

    "raw MB" is what the packed tensors took before packing, "packed MB" what they take now, "kept MB"
    the saved tensors left as they were (parameters and buffers are not counted: the model holds them).
    """
    headers = ["module", "type", "packed", "kept", "raw MB", "packed MB", "kept MB", "ratio", "bits"]
    rows = []
    for name, row in stats.modules.items():
        rows.append([
            name, row.type_name, row.packed_tensors, row.passed_tensors, row.raw_bytes / MB, row.packed_bytes / MB,
            row.passed_bytes / MB, _ratio(row.raw_bytes, row.packed_bytes), _widths(row.bits),
        ])
    all_bits = set().union(*(row.bits for row in stats.modules.values()))
    rows.append([
        "total", "", stats.packed_tensors, stats.passed_tensors, stats.raw_bytes / MB, stats.packed_bytes / MB,
        stats.passed_bytes / MB, _ratio(stats.raw_bytes, stats.packed_bytes), _widths(all_bits),
    ])
    lines = [tabulate(rows, headers=headers, floatfmt=".3f")]
    quant = config.quant
    bits = f"bits=auto budget={config.auto_budget:g}" if config.auto_budget is not None else f"bits={quant.bits}"
    lines.append(
        f"{bits} scheme={quant.scheme} stochastic={quant.stochastic} group_size={quant.group_size} "
        f"min_bytes={config.min_bytes}; deduplicated saves: {stats.deduplicated}"
    )
    if stats.passed_by_reason:
        # (Semicolons: some reasons hold commas.)
        kept = "; ".join(f"{count} {REASONS[reason]}" for reason, count in stats.passed_by_reason.most_common())
        lines.append(f"not packed: {kept}")
    for device, peak in peak_memory.items():
        lines.append(f"peak CUDA memory allocated on cuda:{device} since the block opened: {peak / MB:.1f} MB")
    return "\n".join(lines)
