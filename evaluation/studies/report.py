"""Comparison rows, printed tables and result files for ``pumer-plug compare`` / ``bench``.

Every ratio is taken against the baseline (dense) row *of the same run*, never a stored time.
A row is a flat dict: the measurement keys below plus every field of the environment record, so
``results.jsonl`` can be loaded straight into a data frame.

Example:
    >>> rows = compare_rows(variants, environment=env, accuracy=acc, throughput=tp,
    ...                     memory=mem, gflops=flops, baseline="dense")
    >>> print(format_table(rows))
    >>> write_results(rows, "runs/compare")
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Mapping, Sequence

from tabulate import tabulate

from pumer_plug.evaluation.measure import (CPU_MEMORY_METHOD, CUDA_MEMORY_METHOD, MEMORY_METHODS, MemoryResult,
                                           ThroughputResult)

# Printed header -> row key, in the printed order; the default table fits 120 columns.
TABLE_COLUMNS: dict[str, str] = {
    "method": "method",
    "config": "config",
    "acc": "accuracy",
    "Δacc": "accuracy_change_points",
    "ex/s": "throughput_per_s",
    "speed-up": "throughput_increase",
    "mem MiB": "peak_memory_mib",
    "GFLOPs": "gflops_per_example",
}
# Added by ``--wide`` (and in results.md).
WIDE_COLUMNS: dict[str, str] = {
    **TABLE_COLUMNS,
    "mem reduction": "memory_reduction",
    "latency ms": "latency_ms",
    "activations MiB": "activation_memory_mib",
}
MAX_CONFIG_CHARS = 40  # a longer config description is shortened in the default table
# What each memory method measured, in plain words (the method's name stays in the JSON).
MEMORY_IN_WORDS = {
    CPU_MEMORY_METHOD: "peak memory = weights + inputs + the most tensor memory alive at once during one forward, "
                       "counted by PyTorch (not the process's resident memory)",
    CUDA_MEMORY_METHOD: "peak memory = the most CUDA memory allocated during one forward (weights, inputs, "
                        "activations; torch.cuda.max_memory_allocated)",
}
# Row keys kept in JSON only.
EXTRA_KEYS = ("baseline", "latency_ms", "throughput_per_s_rounds", "activation_memory_mib",
              "memory_method")
MEASUREMENT_KEYS = frozenset(WIDE_COLUMNS.values()) | frozenset(EXTRA_KEYS)


def _throughput_fields(value: ThroughputResult | float | None) -> dict[str, Any]:
    """The throughput columns of a ``ThroughputResult`` or of a plain examples/s number."""
    if isinstance(value, ThroughputResult):
        return {"throughput_per_s": value.throughput_per_s, "latency_ms": value.latency_ms,
                "throughput_per_s_rounds": list(value.throughput_per_s_rounds)}
    return {"throughput_per_s": value, "latency_ms": None, "throughput_per_s_rounds": []}


def _memory_fields(value: MemoryResult | float | None) -> dict[str, Any]:
    """The memory columns of a ``MemoryResult`` or of a plain peak in MiB."""
    if isinstance(value, MemoryResult):
        return {"peak_memory_mib": value.peak_memory_mib, "activation_memory_mib": value.activation_memory_mib,
                "memory_method": value.memory_method}
    return {"peak_memory_mib": value, "activation_memory_mib": None, "memory_method": None}


def _lookup(table: Mapping[str, Any] | None, name: str, what: str) -> Any:
    if table is None:
        return None
    if name not in table:
        raise ValueError(f"no {what} for variant {name!r}; have {sorted(table)}")
    return table[name]


def throughput_increase(rounds: Sequence[float], base_rounds: Sequence[float]) -> float | None:
    """Throughput increase over the baseline: the median of the per-round ratios.

    Rounds are interleaved (dense, then plugged, per round), so a slow moment of a shared machine
    hits both sides of a pair; the median of the paired ratios resists it where the ratio of the
    two medians does not (e.g. dense [158, 152, 114, 179, 63] and PuMer [306, 132, 314, 115, 84]
    ex/s: 1.34x, against 0.87x for the ratio of medians). None unless both have the same rounds.
    """
    if not rounds or len(rounds) != len(base_rounds) or not all(base_rounds):
        return None
    return statistics.median(r / b for r, b in zip(rounds, base_rounds))


#: rounds of one variant differing by more than this factor make a timing untrustworthy
NOISY_SPREAD = 1.5


def format_speedup_note(rows: Sequence[Mapping[str, Any]]) -> str:
    """How the speed-up column was computed, in one line (empty when no row has timed rounds)."""
    rounds = max((len(row.get("throughput_per_s_rounds") or []) for row in rows), default=0)
    if not rounds:
        return ""
    return (f"speed-up = median over {rounds} interleaved round(s) of each round's throughput ratio to dense "
            "(ex/s: median of the rounds)")


def format_timing_note(rows: Sequence[Mapping[str, Any]]) -> str:
    """A warning line when a variant's timed rounds differ by more than ``NOISY_SPREAD`` (empty otherwise)."""
    spreads = [max(r) / min(r) for r in (row.get("throughput_per_s_rounds") or [] for row in rows) if r and min(r) > 0]
    worst = max(spreads, default=1.0)
    if worst <= NOISY_SPREAD:
        return ""
    return (f"warning: timing was noisy (the timed rounds of one variant differ up to {worst:.1f}x; other jobs on "
            "the machine?): the speed-ups are unreliable; rerun on a quiet machine or with more --rounds")


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def _measurements(name: str, accuracy, throughput, memory, gflops) -> dict[str, Any]:
    """Returns one variant's raw measurements (None where not measured)."""
    acc = _lookup(accuracy, name, "accuracy")
    if acc is not None and not 0.0 <= acc <= 1.0:
        raise ValueError(f"accuracy of {name!r} must be a fraction in [0, 1], got {acc}")
    return {
        "accuracy": acc,
        **_throughput_fields(_lookup(throughput, name, "throughput")),
        **_memory_fields(_lookup(memory, name, "memory")),
        "gflops_per_example": _lookup(gflops, name, "GFLOPs"),
    }


def compare_rows(
    variants: Sequence[Any],
    *,
    environment: Mapping[str, Any],
    accuracy: Mapping[str, float | None] | None = None,
    throughput: Mapping[str, Any] | None = None,
    memory: Mapping[str, Any] | None = None,
    gflops: Mapping[str, float] | None = None,
    baseline: str = "dense",
) -> list[dict[str, Any]]:
    """Returns one row per variant with ratios against the ``baseline`` variant.

    Args:
        variants: Objects with ``.name`` and ``.config`` (e.g. ``measure.Variant``), in row order.
        environment: ``measure.environment_record(...)``; its fields are copied into every row.
        accuracy: ``{name: fraction in [0, 1]}``; a value may be None (not evaluated).
        throughput: ``{name: ThroughputResult or examples/s}``.
        memory: ``{name: MemoryResult or peak MiB}``.
        gflops: ``{name: GFLOPs per example}``.
        baseline: Name of the dense variant the ratios refer to.

    Returns:
        Rows with the keys of ``TABLE_COLUMNS`` (accuracy change in percentage points,
        ``throughput_increase`` = variant / dense (median of the paired per-round ratios when
        both have rounds, see :func:`throughput_increase`), ``memory_reduction`` = dense / variant),
        ``EXTRA_KEYS`` and the environment fields. Unmeasured values are None.

    Raises:
        ValueError: if ``baseline`` is not a variant name, a given table lacks a variant, or an
            accuracy lies outside [0, 1].
    """
    names = [v.name for v in variants]
    if baseline not in names:
        raise ValueError(f"baseline variant {baseline!r} is not among the variants {names}")
    raw = {v.name: _measurements(v.name, accuracy, throughput, memory, gflops) for v in variants}
    base = raw[baseline]
    rows = []
    for variant in variants:
        m = raw[variant.name]
        change = None
        if m["accuracy"] is not None and base["accuracy"] is not None:
            change = 100.0 * (m["accuracy"] - base["accuracy"])
        rows.append({
            "method": variant.name, "config": variant.config, **m,
            "accuracy_change_points": change,
            "throughput_increase": (throughput_increase(m["throughput_per_s_rounds"], base["throughput_per_s_rounds"])
                                    or _ratio(m["throughput_per_s"], base["throughput_per_s"])),
            "memory_reduction": _ratio(base["peak_memory_mib"], m["peak_memory_mib"]),
            "baseline": baseline,
            **environment,
        })
    return rows


def _format_cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    formats = {
        "accuracy": lambda v: f"{100.0 * v:.2f}%",
        "accuracy_change_points": lambda v: f"{v:+.2f}",
        "throughput_per_s": lambda v: f"{v:.1f}",
        "throughput_increase": lambda v: f"{v:.2f}x",
        "peak_memory_mib": lambda v: f"{v:.1f}",
        "memory_reduction": lambda v: f"{v:.2f}x",
        "gflops_per_example": lambda v: f"{v:.3g}",
        "latency_ms": lambda v: f"{v:.1f}",
        "activation_memory_mib": lambda v: f"{v:.1f}",
    }
    return formats.get(key, str)(value)


def _shorten(text: str, limit: int = MAX_CONFIG_CHARS) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def below_references(rows: Sequence[Mapping[str, Any]], references: Mapping[str, float] | None) -> list[str]:
    """Returns the methods whose accuracy lies below the task's highest reference accuracy."""
    if not references:
        return []
    floor = max(references.values())
    return [row["method"] for row in rows if row.get("accuracy") is not None and row["accuracy"] < floor]


def format_table(rows: Sequence[Mapping[str, Any]], tablefmt: str = "github", wide: bool = False,
                 references: Mapping[str, float] | None = None) -> str:
    """Returns the rows as a table with the ``TABLE_COLUMNS`` headers (``WIDE_COLUMNS`` if ``wide``).

    The default table fits 120 columns: short headers, config descriptions cut at
    ``MAX_CONFIG_CHARS``. An accuracy below the highest of ``references`` (trivial predictors such
    as the question-only prior) is marked with ``!``; :func:`format_references` explains the mark.
    """
    columns = WIDE_COLUMNS if wide else TABLE_COLUMNS
    flagged = set(below_references(rows, references))
    body = []
    for row in rows:
        cells = [_format_cell(key, row.get(key)) for key in columns.values()]
        if not wide:
            cells[1] = _shorten(cells[1])
        if row["method"] in flagged:
            cells[2] += " !"
        body.append(cells)
    return tabulate(body, headers=list(columns), tablefmt=tablefmt, disable_numparse=True)


def format_memory_note(rows: Sequence[Mapping[str, Any]]) -> str:
    """What "mem MiB" measured, in plain words, per memory method of the rows (wrapped at 120 columns)."""
    import textwrap

    methods = sorted({row.get("memory_method") for row in rows if row.get("memory_method")})
    return "\n".join(textwrap.fill(MEMORY_IN_WORDS.get(m, f"peak memory measured by {m}"), 120, subsequent_indent="  ")
                     for m in methods)


def environment_of(row: Mapping[str, Any]) -> dict[str, Any]:
    """Returns the environment fields of a row (everything that is not a measurement)."""
    return {k: v for k, v in row.items() if k not in MEASUREMENT_KEYS}


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def format_references(references: Mapping[str, float], rows: Sequence[Mapping[str, Any]] = ()) -> str:
    """One line naming the task's reference accuracies, e.g. ``majority answer 18.0%``; if any of
    ``rows`` lies below the highest, a second line names them (they are marked ``!`` in the table)."""
    line = "reference points on the same examples: " + ", ".join(
        f"{name} {100 * value:.1f}%" for name, value in references.items())
    below = below_references(rows, references)
    if below:
        best = max(references, key=references.get)
        line += f"\n! below the {best} ({100 * references[best]:.1f}%), i.e. worse than ignoring the image: {', '.join(below)}"
    return line


def _markdown(rows: Sequence[Mapping[str, Any]], references: Mapping[str, float] | None = None) -> str:
    lines = ["# Results", "", format_table(rows, wide=True, references=references), "",
             "Accuracy change is in percentage points; ratios are against the "
             f"`{rows[0].get('baseline')}` row of the same run."]
    if references:
        line = format_references(references, rows)
        lines += ["", line[0].upper() + line[1:] + "."]
    lines += ["", "## Environment", ""]
    lines += [f"- {key}: {value}" for key, value in environment_of(rows[0]).items()]
    methods = sorted({row.get("memory_method") for row in rows if row.get("memory_method")})
    lines += ["", "## Memory method", ""]
    lines += [f"- `{m}`: {MEMORY_IN_WORDS.get(m, '')}. {MEMORY_METHODS.get(m, '(undocumented)')}" for m in methods] or ["- none"]
    return "\n".join(lines) + "\n"


def write_results(rows: Sequence[Mapping[str, Any]], output_dir: str | Path,
                  references: Mapping[str, float] | None = None) -> dict[str, Path]:
    """Appends the rows to ``results.jsonl`` and (re)writes ``results.md`` in ``output_dir``.

    ``results.jsonl`` gets one JSON object per row and is only ever appended to, so successive
    runs accumulate; ``results.md`` shows this call's rows, the task's ``references`` (accuracies
    of trivial predictors such as the majority answer), environment and memory method.

    Returns:
        ``{"jsonl": path, "markdown": path}``.

    Raises:
        ValueError: if ``rows`` is empty.
    """
    if not rows:
        raise ValueError("no rows to write")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    jsonl, markdown = output_dir / "results.jsonl", output_dir / "results.md"
    text = "".join(json.dumps({k: _json_safe(v) for k, v in row.items()}, default=str) + "\n"
                   for row in rows)
    with jsonl.open("a", encoding="utf-8") as handle:
        handle.write(text)
    markdown.write_text(_markdown(rows, references), encoding="utf-8")
    return {"jsonl": jsonl, "markdown": markdown}
