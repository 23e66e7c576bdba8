"""``pumer-plug plot``: the accuracy / throughput trade-off of sweep results, and the paper's tables.

From the ``results.jsonl`` of ``pumer-plug sweep`` it writes, next to each other:

- ``tradeoff.png`` and ``tradeoff.svg`` (PuMer Figure 5): accuracy (%) against throughput
  increase (x; on a generative task the prefill speed-up, as the records' ``speedup_label`` says), one line per series (method) through its points sorted by throughput, the Pareto
  front over all points (the dense model included) marked, and the dense model as the reference
  point at 1x with a dotted line at its accuracy.
- ``tokens.png`` and ``tokens.svg`` when the points record ``image_tokens_kept`` (PuMer, FastV,
  random, pool, DynamicViT; not ToMe, which mixes modalities): accuracy against the image tokens
  left after the last reduction, the dense model at the task's image tokens.
- ``table3.md`` (PuMer Table 3 layout, grid ``table3`` only; ``table.md`` for any other grid): one
  row per point label: accuracy (change in points),
  throughput increase, memory reduction, GFLOPs per example.
- ``table4.md`` (PuMer Table 4 layout, grid ``table4`` only): PuMer points with their reduction layers and ratios.

Only finished points are drawn; when a key was measured more than once, the latest record counts.
Each point's ratios are taken against the dense model of its own run.

Example:
    >>> plot_results("results/sweep/figure5/results.jsonl")
    {'png': ..., 'svg': ..., 'table3': ..., 'table4': ...}
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from tabulate import tabulate

from pumer_plug.errors import UserError

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h")
ANNOTATE_AT_MOST = 12
#: point labels wrap at this many characters (a label runs at most this far towards the middle)
LABEL_WIDTH = 32


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats in both coordinates (both maximised), by increasing x.

    A point is dominated when another has x >= and y >= with at least one strictly greater; of
    identical points only the first is kept.
    """
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1], i))
    front, best_y = [], float("-inf")
    for i in order:
        if points[i][1] > best_y:
            front.append(i)
            best_y = points[i][1]
    return sorted(front, key=lambda i: (points[i][0], i))


def select_records(records: Sequence[dict[str, Any]]) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The latest dense record and the latest finished record of every point key, in first-seen order."""
    dense, points = None, {}
    for record in records:
        if record.get("status") != "ok":
            continue
        if record.get("key") == "dense":
            dense = record
        elif record.get("accuracy") is not None and record.get("throughput_increase") is not None:
            points[record["key"]] = record
    return dense, list(points.values())


def _series(record: dict[str, Any]) -> str:
    name = record.get("series") or record.get("method", "?")
    return f"{name} (finetuned)" if record.get("mode") == "finetune" else name


def _labels(record: dict[str, Any]) -> list[str]:
    suffix = " (finetuned)" if record.get("mode") == "finetune" else ""
    return [f"{label}{suffix}" for label in (record.get("labels") or [record.get("label", "?")])]


def speedup_label(dense: dict[str, Any] | None, points: Sequence[dict[str, Any]]) -> str:
    """What the records' speed-up measures (``Task.speedup_label``: "throughput increase", or
    "prefill speed-up" for a generative task); older records without it: "throughput increase"."""
    for record in [dense or {}, *points]:
        if record.get("speedup_label"):
            return str(record["speedup_label"])
    return "throughput increase"


def plot_tradeoff(dense: dict[str, Any] | None, points: Sequence[dict[str, Any]], stem: Path,
                  title: str | None = None, annotate: bool | None = None) -> dict[str, Path]:
    """Draws accuracy vs throughput increase (or the records' ``speedup_label``) into ``stem.png`` and ``stem.svg``."""
    return _save(tradeoff_figure(dense, points, title=title, annotate=annotate), stem)


def tradeoff_figure(dense: dict[str, Any] | None, points: Sequence[dict[str, Any]], title: str | None = None,
                    annotate: bool | None = None) -> Any:
    """The accuracy vs throughput increase (or ``speedup_label``) figure (a matplotlib ``Figure``),
    point labels inside the axes."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 5.0), layout="constrained")
    axes = figure.add_subplot()
    series: dict[str, list[dict[str, Any]]] = {}
    for record in points:
        series.setdefault(_series(record), []).append(record)
    colors = [f"C{i}" for i in range(10)]
    for index, (name, records) in enumerate(series.items()):
        records = sorted(records, key=lambda r: r["throughput_increase"])
        axes.plot([r["throughput_increase"] for r in records], [100 * r["accuracy"] for r in records],
                  marker=MARKERS[index % len(MARKERS)], color=colors[index % 10], label=name, linewidth=1.5, markersize=7)
    xy = [(r["throughput_increase"], 100 * r["accuracy"]) for r in points]
    if dense is not None:
        xy.append((1.0, 100 * dense["accuracy"]))
        axes.axhline(100 * dense["accuracy"], color="0.5", linestyle=":", linewidth=1)
        axes.plot([1.0], [100 * dense["accuracy"]], marker="*", markersize=16, color="black", linestyle="none",
                  label=f"dense ({100 * dense['accuracy']:.1f}%)", zorder=5)
    front = [xy[i] for i in pareto_front(xy)]
    axes.plot([x for x, _ in front], [y for _, y in front], color="0.3", linewidth=7, alpha=0.18, zorder=0,
              solid_capstyle="round", label="Pareto front")
    axes.plot([x for x, _ in front], [y for _, y in front], marker="o", markersize=13, markerfacecolor="none",
              markeredgecolor="0.3", linestyle="none", zorder=4)
    axes.margins(x=0.12, y=0.08)  # room for point labels
    if annotate if annotate is not None else len(points) <= ANNOTATE_AT_MOST:
        _annotate_inward(axes, points, xy)
    label = speedup_label(dense, points)
    axes.set_xlabel(f"{label} (x)")
    axes.set_ylabel("accuracy (%)")
    axes.set_title(title or f"Accuracy vs. {label} (right and top is better)")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="best", fontsize=9, framealpha=0.9)
    return figure


def _save(figure: Any, stem: Path) -> dict[str, Path]:
    paths = {"png": stem.with_suffix(".png"), "svg": stem.with_suffix(".svg")}
    figure.savefig(paths["png"], dpi=150)
    figure.savefig(paths["svg"])
    return paths


def _annotate_inward(axes: Any, points: Sequence[dict[str, Any]], xy: Sequence[tuple[float, float]]) -> None:
    """Labels every point with its text running towards the middle of the plot, so that a label
    at the right or top edge stays inside the axes (long labels wrap at ``LABEL_WIDTH`` columns)."""
    import textwrap

    xs, ys = [x for x, _ in xy], [y for _, y in xy]
    x_mid, y_top = (min(xs) + max(xs)) / 2, min(ys) + 0.8 * (max(ys) - min(ys))
    for record in points:
        x, y = record["throughput_increase"], 100 * record["accuracy"]
        left, below = x > x_mid, y > y_top and max(ys) > min(ys)
        text = textwrap.fill(", ".join(_labels(record)), LABEL_WIDTH)
        axes.annotate(text, (x, y), textcoords="offset points", xytext=(-6 if left else 6, -6 if below else 6),
                      ha="right" if left else "left", va="top" if below else "bottom", fontsize=7, color="0.25")


def plot_kept_tokens(dense: dict[str, Any] | None, points: Sequence[dict[str, Any]], stem: Path,
                     title: str | None = None) -> dict[str, Path]:
    """Draws accuracy vs image tokens kept (after the last reduction) into ``stem.png`` and ``stem.svg``:
    one line per series over the points that record ``image_tokens_kept``, the dense model at its
    ``image_tokens`` (when the task knows them) and a dotted line at its accuracy."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 5.0), layout="constrained")
    axes = figure.add_subplot()
    series: dict[str, list[dict[str, Any]]] = {}
    for record in points:
        if record.get("image_tokens_kept") is not None:
            series.setdefault(_series(record), []).append(record)
    for index, (name, records) in enumerate(series.items()):
        records = sorted(records, key=lambda r: r["image_tokens_kept"])
        axes.plot([r["image_tokens_kept"] for r in records], [100 * r["accuracy"] for r in records],
                  marker=MARKERS[index % len(MARKERS)], color=f"C{index % 10}", label=name, linewidth=1.5, markersize=7)
    if dense is not None:
        axes.axhline(100 * dense["accuracy"], color="0.5", linestyle=":", linewidth=1)
        if dense.get("image_tokens"):
            axes.plot([dense["image_tokens"]], [100 * dense["accuracy"]], marker="*", markersize=16, color="black",
                      linestyle="none", label=f"dense ({100 * dense['accuracy']:.1f}%)", zorder=5)
    axes.set_xscale("log", base=2)
    ticks = sorted({r["image_tokens_kept"] for rs in series.values() for r in rs}
                   | ({dense["image_tokens"]} if dense is not None and dense.get("image_tokens") else set()))
    axes.set_xticks(ticks, [str(t) for t in ticks])
    axes.minorticks_off()
    axes.set_xlabel("image tokens kept after the last reduction (log scale)")
    axes.set_ylabel("accuracy (%)")
    axes.set_title(title or "Accuracy vs. image tokens kept (left and top is better)")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="best", fontsize=9, framealpha=0.9)
    return _save(figure, stem)


def _accuracy_cell(record: dict[str, Any], dense: dict[str, Any] | None) -> str:
    text = f"{100 * record['accuracy']:.2f}"
    if dense is not None and record is not dense:
        text += f" ({100 * (record['accuracy'] - dense['accuracy']):+.2f})"
    return text


def _ratio(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _gflops(record: dict[str, Any]) -> str:
    value = record.get("gflops_per_example")
    return "-" if value is None else f"{value:.3g}"


def table3(dense: dict[str, Any] | None, points: Sequence[dict[str, Any]]) -> str:
    """PuMer Table 3 layout: one row per point label, the dense model first; an "Image Tokens Kept"
    column when the points record them, the speed-up named by the records' ``speedup_label``."""
    tokens = any(r.get("image_tokens_kept") is not None for r in points)
    headers = ["Model", "Accuracy (%)", speedup_label(dense, points).title(), "Memory Reduction", "GFLOPs per example"]
    headers += ["Image Tokens Kept"] if tokens else []
    kept = lambda r: [] if not tokens else ["-" if r.get("image_tokens_kept") is None else str(r["image_tokens_kept"])]  # noqa: E731
    rows = [] if dense is None else [["dense", _accuracy_cell(dense, None), "1.00x", "1.00x", _gflops(dense), *kept(dense)]]
    for record in points:
        for label in _labels(record):
            rows.append([label, _accuracy_cell(record, dense), _ratio(record["throughput_increase"]),
                         _ratio(record.get("memory_reduction")), _gflops(record), *kept(record)])
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def table4(dense: dict[str, Any] | None, points: Sequence[dict[str, Any]]) -> str | None:
    """PuMer Table 4 layout over the PuMer points (None if there are none); the dense model last."""
    headers = ["Choice", "Reduction Layers", "Prune Ratio", "Image Merge Ratio", "Text Merge Ratio", "Accuracy (%)",
               "Throughput Increase"]
    rows = []
    for record in points:
        config = record.get("config") or {}
        if record.get("method") != "pumer":
            continue
        rows.append([record.get("group") or "", ",".join(map(str, config.get("reduction_layers", []))),
                     f"{config.get('prune_ratio', 0):g}", f"{config.get('image_merge_ratio', 0):g}",
                     f"{config.get('text_merge_ratio', 0):g}", _accuracy_cell(record, dense),
                     _ratio(record["throughput_increase"])])
    if not rows:
        return None
    if dense is not None:
        rows.append(["dense", "-", "-", "-", "-", _accuracy_cell(dense, None), "1.00x"])
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def _caption(dense: dict[str, Any] | None, points: Sequence[dict[str, Any]]) -> str:
    first = points[0] if points else dense or {}
    return (f"Task `{first.get('task')}`, {first.get('num_test_examples') or 'default'} test examples, "
            f"{first.get('device_name') or first.get('device')}, batch size {first.get('batch_size')}, "
            f"{first.get('rounds')} timed round(s). Accuracy change in points against the dense model; "
            "ratios against the dense model of the same run."
            + (" Rows that share one measurement (the same method and config, e.g. 'w/o distillation' without "
               "--finetune) show the same numbers." if any(len(r.get("labels") or ()) > 1 for r in points) else ""))


def plot_results(results_path: str | Path, output_dir: str | Path | None = None, title: str | None = None,
                 annotate: bool | None = None) -> dict[str, Path]:
    """Writes the trade-off figure (PNG, SVG) and the Table 3/4 layouts from a sweep's results.

    Raises:
        UserError: no such file, not a sweep results file, or no finished point in it.
    """
    from pumer_plug.evaluation.studies.sweep import read_records

    results_path = Path(results_path)
    if not results_path.exists():
        raise UserError(f"no results file {results_path}; run `pumer-plug sweep` first")
    records = read_records(results_path)
    if records and not any("status" in r and "key" in r for r in records):
        raise UserError(f"{results_path} is not a sweep results file (no record has a sweep point's key and status); "
                        "plot reads what `pumer-plug sweep` writes, e.g. results/sweep/figure5/results.jsonl")
    dense, points = select_records(records)
    if not points:
        raise UserError(f"{results_path} has no finished point to plot")
    output = Path(output_dir) if output_dir is not None else results_path.parent
    output.mkdir(parents=True, exist_ok=True)
    paths = plot_tradeoff(dense, points, output / "tradeoff", title=title, annotate=annotate)
    if any(r.get("image_tokens_kept") is not None for r in points):
        tokens = plot_kept_tokens(dense, points, output / "tokens", title=title)
        paths.update(tokens_png=tokens["png"], tokens_svg=tokens["svg"])
    caption = _caption(dense, points)
    grids = {r.get("sweep") for r in points}
    if grids == {"table4"}:  # the Table 4 layout needs the preset's "Choice" groups
        four = table4(dense, points)
        if four is not None:
            paths["table4"] = output / "table4.md"
            paths["table4"].write_text(f"# Design choices (PuMer Table 4 layout)\n\n{four}\n\n{caption}\n")
    elif grids == {"table3"}:
        paths["table3"] = output / "table3.md"
        paths["table3"].write_text(f"# Ablation (PuMer Table 3 layout)\n\n{table3(dense, points)}\n\n{caption}\n")
    else:  # figure5 or a custom grid: one row per point label
        paths["table"] = output / "table.md"
        paths["table"].write_text(f"# Results of {', '.join(sorted(map(str, grids)))}\n\n{table3(dense, points)}\n\n{caption}\n")
    return paths
