"""``pumer-plug sweep``: a grid of methods x knobs, every point measured like ``compare``.

Each point gets accuracy on the task's test split, throughput increase (timed interleaved with the
dense model in the same process, warm-up dropped, median of ``rounds``), peak memory, GFLOPs per
example and their ratios to the dense model, which is measured once per run as the reference. A
record per point is appended to ``results.jsonl`` as soon as it is measured; re-running skips
points that finished (key: method + canonical config JSON, plus the finetuning settings with
``--finetune``), retries points that failed, and a point that fails records its error instead of
ending the sweep. ``--finetune`` trains each point first (with distillation, see
:mod:`~pumer_plug.evaluation.training.finetune`) into ``finetuned/<point>/``; its cost is measured
plug-and-play on the reference model with the same config (weights do not change the token
counts, so they do not change the cost).

Grid file (YAML or JSON; documented in ``docs/grids.md``, example ``docs/grids/example.yaml``)::

    name: my-grid                 # optional; default: the file name
    points:                       # blocks; each expands to configs x the cartesian product of vary
      - method: pumer             # a registered method (required)
        base: builtin-digits      # optional: preset name, config file, or mapping of config fields
        vary:                     # optional: config field -> list of values (cartesian product)
          prune_ratio: [0.1, 0.2]
          image_merge_ratio: [0.2, 0.3]
        configs:                  # optional: explicit settings; each may also set label/group/series/finetune
          - {text_merge_ratio: 0.1, label: "t=0.1"}
        label: PuMer              # optional: row name in tables (default: series + the config's summary())
        series: PuMer             # optional: line in the plot (default: the method's display name)
        group: ratios             # optional: "choice" column of the Table-4 layout
        finetune: {distill: false}  # optional: FinetuneConfig overrides, used with --finetune

Presets reproduce the paper's studies on the built-in 6-layer model, the paper's 12-layer
reduction layers scaled by 1/2 (``floor(l / 2)``; consecutive layers stay consecutive):
``figure5`` (PuMer vs ToMe vs DynamicViT at several throughputs; DynamicViT's predictors are
untrained unless ``--finetune``), ``table3`` (PuMer without text-informed pruning, without merging,
without distillation; the last equals PuMer unless ``--finetune``) and ``table4`` (the paper's
Table 4 rows: ratios, number and location of reduction layers). ``decoder-budgets`` is for the
built-in decoder VLM (``--task builtin-llava``, 144 image tokens): PuMer, FastV and random keep 72,
36, 16 and 9 image tokens after decoder layer 0, pool keeps 36, 16 and 9 (strides 2, 3, 4) before
the decoder. On a generative task the timed forward is the prefill (``Task.speedup_label``).

Example:
    >>> grid = load_grid("table3")
    >>> run_sweep(get_task("builtin", TaskOptions(num_test_examples=300)), grid.points, "results/sweep/table3/results.jsonl")
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from pumer_plug.config import read_config_file
from pumer_plug.errors import UserError
from pumer_plug.evaluation.measure import (Variant, attention_kernel, environment_record, measure_flops, measure_peak_memory,
                                          measure_throughput)
from pumer_plug.evaluation.parallel import Processes
from pumer_plug.evaluation.studies.report import compare_rows
from pumer_plug.evaluation.tasks.base import Task, check_methods_fit, load_config, on_device
from pumer_plug.evaluation.training.finetune import (FinetuneConfig, attach_finetuned, config_to_dict, finetune,
                                                     load_finetuned)
from pumer_plug.handle import apply
from pumer_plug.registry import METHODS
BLOCK_KEYS = {"method", "base", "vary", "configs", "label", "series", "group", "finetune"}
ENTRY_KEYS = {"label", "series", "group", "finetune"}


@dataclass(frozen=True)
class SweepPoint:
    """One grid point: a method, its config, and how tables and plots name it."""

    method: str
    config: Any
    label: str
    series: str
    group: str | None = None
    finetune: tuple[tuple[str, Any], ...] = ()

    def key(self, finetune: FinetuneConfig | None = None) -> str:
        """What makes a point finished: method, canonical config JSON, and the finetuning settings."""
        key = f"{self.method} {canonical_json(config_to_dict(self.config))}"
        if finetune is not None:
            settings = {k: v for k, v in self.finetune_config(finetune).to_dict().items()
                        if k not in ("method", "method_config", "checkpoint_every")}
            key += f" finetune={canonical_json(settings)}"
        return key

    def finetune_config(self, base: FinetuneConfig) -> FinetuneConfig:
        return dataclasses.replace(base, method=self.method, method_config=self.config, **dict(self.finetune))


@dataclass(frozen=True)
class Grid:
    name: str
    points: list[SweepPoint]


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


# -- presets (written in the grid-file schema) ---------------------------------------------------------
def _table4_rows() -> list[dict[str, Any]]:
    """PuMer Table 4 (ViLT SNLI-VE, 12 layers), reduction layers scaled to 6 layers."""
    rows = [("ratios", (1, 2, 4), 0.1, 0.3, 0.2), ("ratios", (1, 2, 4), 0.3, 0.3, 0.2),  # paper 2,5,8
            ("ratios", (1, 2, 4), 0.1, 0.3, 0.5), ("ratios", (1, 2, 4), 0.1, 0.5, 0.2),
            ("# of layers", (1,), 0.1, 0.3, 0.2), ("# of layers", (1, 2), 0.1, 0.3, 0.2),  # paper 2 / 2,4
            ("# of layers", (1, 2, 3), 0.1, 0.3, 0.2),  # paper 2,4,6
            ("locations", (1, 2, 3), 0.2, 0.2, 0.2), ("locations", (3, 4, 5), 0.2, 0.2, 0.2),  # paper 2,3,4 / 7,8,9
            ("PuMer (ours)", (1, 2, 3, 4), 0.1, 0.3, 0.2)]  # paper 2,4,6,8
    return [{"group": g, "reduction_layers": list(l), "prune_ratio": k, "image_merge_ratio": r, "text_merge_ratio": t}
            for g, l, k, r, t in rows]


def _decoder_budget_points(image_tokens: int = 144, budgets: tuple[int, ...] = (72, 36, 16, 9)) -> list[dict[str, Any]]:
    """The decoder methods at equal kept image tokens: PuMer, FastV and random keep ``budgets`` of
    ``image_tokens`` after decoder layer 0 (FastV's K = 1); pool keeps the squares its strides give.

    PuMer prunes to ``ceil(1.5 * keep)`` tokens and merges the rest down to ``keep`` (the task's
    default balance), its ratios chosen so the rounded counts are exact.
    """
    pumer = []
    for keep in budgets:
        survivors = min(image_tokens, -(-3 * keep // 2))
        pumer.append({"label": f"PuMer keep {keep}", "prune_ratio": (image_tokens - survivors) / image_tokens,
                      "image_merge_ratio": (survivors - keep) / image_tokens})
    side = math.isqrt(image_tokens)
    strides: dict[int, int] = {}  # kept tokens -> the smallest stride that keeps them
    for stride in range(2, side + 1):
        strides.setdefault((-(-side // stride)) ** 2, stride)
    return [
        {"method": "pumer", "base": {"reduction_layers": [0], "text_merge_ratio": 0.0}, "configs": pumer},
        {"method": "fastv", "configs": [{"label": f"FastV keep {k}", "layer": 1, "keep_tokens": k} for k in budgets]},
        {"method": "random", "configs": [{"label": f"Random keep {k}", "layer": 1, "keep_tokens": k, "seed": 0}
                                         for k in budgets]},
        {"method": "pool", "configs": [{"label": f"Pool keep {k}", "stride": strides[k]} for k in budgets if k in strides]},
    ]


PRESETS: dict[str, dict[str, Any]] = {
    "figure5": {"name": "figure5", "points": [
        {"method": "pumer", "base": "builtin-digits", "configs": [
            {"prune_ratio": k, "image_merge_ratio": r} for k, r in ((0.2, 0.1), (0.3, 0.2), (0.5, 0.3), (0.7, 0.4))]},
        {"method": "tome", "vary": {"r": [4, 8, 12, 16]}},
        {"method": "dynamicvit", "base": {"reduction_layers": [1, 3, 4]},  # paper 3,6,9
         "vary": {"keep_ratio": [0.9, 0.7, 0.5]}},
    ]},
    "table3": {"name": "table3", "points": [
        {"method": "pumer", "base": "builtin-digits", "configs": [
            {"label": "PuMer"},
            {"label": "w/o text-informed image pruning", "prune_ratio": 0.0},
            {"label": "w/o modality-aware merging", "image_merge_ratio": 0.0, "text_merge_ratio": 0.0},
            {"label": "w/o distillation", "finetune": {"distill": False}},
        ]},
    ]},
    "table4": {"name": "table4", "points": [{"method": "pumer", "configs": _table4_rows()}]},
    "decoder-budgets": {"name": "decoder-budgets", "points": _decoder_budget_points()},
}


# -- grid files ----------------------------------------------------------------------------------------
def load_grid(spec: str) -> Grid:
    """Returns the grid of a preset name or a YAML/JSON grid file.

    Raises:
        ValueError: unknown preset that is not a file, an unreadable file, or a bad grid (one line
            naming the file, the block and the problem).
    """
    if spec in PRESETS:
        return parse_grid(PRESETS[spec], f"preset {spec}", spec)
    path = Path(spec)
    if path.suffix.lower() in (".json", ".yaml", ".yml") or path.exists():
        return parse_grid(read_config_file(path, "grid file"), str(path), path.stem)
    raise UserError(f"{spec!r} is neither a sweep preset ({', '.join(sorted(PRESETS))}) nor a .yaml/.json grid file")


def parse_grid(data: Any, source: str, default_name: str = "sweep") -> Grid:
    """Expands a grid mapping (the grid-file schema) into points; see the module docstring."""
    if not isinstance(data, dict) or not isinstance(data.get("points"), list) or not data["points"]:
        raise UserError(f"{source}: expected a mapping with a non-empty 'points' list")
    unknown = sorted(set(data) - {"name", "points"})
    if unknown:
        raise UserError(f"{source}: unknown top-level key(s) {unknown}; allowed: name, points")
    points: list[SweepPoint] = []
    for index, block in enumerate(data["points"]):
        where = f"{source}: points[{index}]"
        try:
            points += _expand_block(block, where)
        except ValueError as err:
            message = str(err)
            raise UserError(message if message.startswith(where) else f"{where}: {message}") from None
    return Grid(str(data.get("name") or default_name), points)


def _expand_block(block: Any, where: str) -> list[SweepPoint]:
    if not isinstance(block, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(block).__name__}")
    unknown = sorted(set(block) - BLOCK_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(sorted(BLOCK_KEYS))}")
    method = block.get("method")
    if method not in METHODS.list():
        raise ValueError(f"{where}: unknown method {method!r}; choose from: {', '.join(METHODS.list())}")
    base = _base_values(method, block.get("base"))
    vary = block.get("vary") or {}
    if not isinstance(vary, dict) or not all(isinstance(v, list) and v for v in vary.values()):
        raise ValueError(f"{where}: 'vary' must map config fields to non-empty lists of values")
    entries = block.get("configs") or [{}]
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ValueError(f"{where}: 'configs' must be a list of mappings")
    points = []
    for entry, combo in itertools.product(entries, itertools.product(*vary.values())):
        fields = {k: v for k, v in entry.items() if k not in ENTRY_KEYS}
        config = load_config(method, {**base, **fields, **dict(zip(vary, combo))})
        meta = {k: entry.get(k, block.get(k)) for k in ENTRY_KEYS}
        series = str(meta["series"] or METHODS.get(method).display_name)
        label = str(meta["label"] or f"{series} {config.summary()}".strip())
        group = None if meta["group"] is None else str(meta["group"])
        points.append(SweepPoint(method, config, label, series, group, _finetune_overrides(meta["finetune"])))
    return points


def _base_values(method: str, base: Any) -> dict[str, Any]:
    if base is None:
        return {}
    if isinstance(base, dict):
        return dict(base)
    return config_to_dict(load_config(method, base))


def _finetune_overrides(values: Any) -> tuple[tuple[str, Any], ...]:
    if values is None:
        return ()
    if not isinstance(values, dict):
        raise ValueError("'finetune' must be a mapping of FinetuneConfig fields")
    allowed = {f.name for f in dataclasses.fields(FinetuneConfig)} - {"method", "method_config"}
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ValueError(f"'finetune' has unknown FinetuneConfig field(s) {unknown}")
    FinetuneConfig(**values)  # checks the values
    return tuple(sorted(values.items()))


# -- results -------------------------------------------------------------------------------------------
def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a results file (none if it does not exist); a torn last line is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"pumer-plug: warning: {path}:{number} is not a JSON line; skipped", file=sys.stderr)
    return records


def _append(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\n")


def _unique(points: Sequence[SweepPoint], finetune_base: FinetuneConfig | None) -> list[tuple[SweepPoint, list[str]]]:
    """Points with distinct keys, each with the labels of every grid point that shares its key."""
    merged: dict[str, tuple[SweepPoint, list[str]]] = {}
    for point in points:
        key = point.key(finetune_base)
        if key in merged:
            merged[key][1].append(point.label)
        else:
            merged[key] = (point, [point.label])
    return list(merged.values())


@dataclass
class _Reference:
    """The dense model of this run and what every point is measured against."""

    task: Task
    procs: Processes
    model: torch.nn.Module
    test: Iterable
    timing: list
    device: torch.device
    environment: dict[str, Any]
    accuracy: float = 0.0
    memory: Any = None
    gflops: float = 0.0
    image_tokens: int | None = None


def _reference(task: Task, batch_size: int, timing_batches: int, device: str,
               points: Sequence[SweepPoint] = ()) -> _Reference:
    procs = Processes.current(device)  # under accelerate launch: this process's rank and device
    dev = procs.device
    model = task.load_model(dev).eval()
    test = on_device(procs.shard(task.batches("test", batch_size)), dev, torch.float32)
    timing = [x for x, _ in itertools.islice(test, timing_batches)] if procs.is_main else []
    image_tokens = task.image_tokens(timing[0]) if timing else None
    for point in points:  # before any evaluation; the error names the grid's point
        try:
            check_methods_fit(model, task.adapter, [(point.method, point.config)], image_tokens)
        except UserError as error:
            raise UserError(f"sweep point {point.label!r}: {error}") from error
    env = environment_record(dev, next(model.parameters()).dtype, batch_size, torch.get_num_threads(),
                             attention_kernel(model))
    ref = _Reference(task, procs, model, test, timing, dev, {**env, "task": task.name, "metric": task.metric,
                                                             "accuracy_processes": procs.count})
    ref.accuracy = procs.accuracy(task, model, test)
    if not procs.is_main:  # the other processes only score their share of the test batches
        return ref
    ref.memory = measure_peak_memory(model, ref.timing[0], None, device=dev)
    ref.gflops = measure_flops(model, ref.timing[0], None, device=dev)
    ref.image_tokens = image_tokens
    return ref


def _point_accuracy(ref: _Reference, point: SweepPoint, finetune_base: FinetuneConfig | None,
                    output_dir: Path, progress: bool) -> tuple[float, dict[str, Any]]:
    task = ref.task
    if finetune_base is None:
        with apply(ref.model, adapter=task.adapter, config=point.config, method=point.method):
            return ref.procs.accuracy(task, ref.model, ref.test), {}
    slug = hashlib.sha1(point.key(finetune_base).encode()).hexdigest()[:10]
    folder = output_dir / "finetuned" / f"{point.method}-{slug}"
    result = finetune(task, point.finetune_config(finetune_base), folder, resume=True,
                      device=str(ref.device), progress=progress)
    model, _, _ = load_finetuned(folder, model=task.load_model(ref.device), device=str(ref.device))
    with attach_finetuned(model, folder, adapter=task.adapter):
        accuracy = ref.procs.accuracy(task, model, ref.test)
    return accuracy, {"finetuned_dir": str(folder), "best_val_accuracy": result.best_val_accuracy,
                      "initial_val_accuracy": result.initial_val_accuracy, "epochs_run": result.epochs_run,
                      "finetune_seconds": result.seconds}


def kept_image_tokens(counts: dict[int, Any]) -> int | None:
    """Image tokens leaving the last reduction layer (``handle.token_counts``); None when nothing was
    reduced or a method mixed the modalities (ToMe)."""
    if not counts or any(c.mixed for c in counts.values()):
        return None
    return counts[max(counts)].image


def _measure_point(ref: _Reference, point: SweepPoint, finetune_base: FinetuneConfig | None, rounds: int,
                   output_dir: Path, progress: bool) -> dict[str, Any]:
    handles = []

    def attach(model):
        handles.append(apply(model, adapter=ref.task.adapter, config=point.config, method=point.method))
        return handles[-1]

    accuracy, extra = _point_accuracy(ref, point, finetune_base, output_dir, progress)
    if not ref.procs.is_main:
        return {}
    dense, variant = Variant("dense", "-", None), Variant("point", point.label, attach)
    throughput = measure_throughput(ref.model, ref.timing, [dense, variant], rounds=rounds, warmup=1, device=ref.device)
    memory = measure_peak_memory(ref.model, ref.timing[0], attach, device=ref.device)
    gflops = measure_flops(ref.model, ref.timing[0], attach, device=ref.device)
    kept = kept_image_tokens(handles[-1].token_counts)  # of the FLOPs forward; the counts outlive remove()
    row = compare_rows([dense, variant], environment=ref.environment, accuracy={"dense": ref.accuracy, "point": accuracy},
                       throughput=throughput, memory={"dense": ref.memory, "point": memory},
                       gflops={"dense": ref.gflops, "point": gflops})[1]
    for key in ("method", "config"):  # compare_rows' variant name and label; the record has its own
        row.pop(key)
    return {**row, **extra, "dense_accuracy": ref.accuracy, "dense_throughput_per_s": throughput["dense"].throughput_per_s,
            "flops_ratio": gflops / ref.gflops if ref.gflops else None, "image_tokens_kept": kept,
            "image_tokens": ref.image_tokens}


def _dense_record(ref: _Reference, rounds: int) -> dict[str, Any]:
    dense = Variant("dense", "-", None)
    throughput = measure_throughput(ref.model, ref.timing, [dense], rounds=rounds, warmup=1, device=ref.device)
    row = compare_rows([dense], environment=ref.environment, accuracy={"dense": ref.accuracy}, throughput=throughput,
                       memory={"dense": ref.memory}, gflops={"dense": ref.gflops})[0]
    return {**row, "image_tokens": ref.image_tokens, "image_tokens_kept": ref.image_tokens}


def _check_settings(records: list[dict[str, Any]], settings: dict[str, Any], path: Path) -> None:
    for record in records:
        differ = sorted(k for k, v in settings.items() if k in record and record[k] != v)
        if differ:
            raise UserError(f"{path} holds results measured with other settings "
                             f"({', '.join(f'{k}={record[k]!r}' for k in differ)}); choose another --output")


def run_sweep(task: Task, points: Sequence[SweepPoint], results_path: str | Path, *, name: str = "sweep",
              finetune_base: FinetuneConfig | None = None, batch_size: int = 64, device: str = "cpu",
              rounds: int = 3, timing_batches: int = 2, progress: bool = True) -> list[dict[str, Any]]:
    """Measures every unfinished point and appends one record per point (and one dense record) to ``results_path``.

    Returns:
        The records written by this call (dense first); ``[]`` when every point had finished, and on
        a process other than the main one under ``accelerate launch`` (:mod:`~pumer_plug.evaluation.parallel`).

    Raises:
        UserError: the results file holds records of another task or test-split size.
    """
    path = Path(results_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = read_records(path)
    opts = task.options  # what was measured: a row of another model, data or subset is never reused
    settings = {"task": task.name, "num_test_examples": opts.num_test_examples, "model": opts.model,
                "data_dir": opts.data_dir, "split": opts.split, "limit": opts.limit}
    _check_settings(records, settings, path)
    done = {r.get("key") for r in records if r.get("status") == "ok"}
    todo = [(p, labels) for p, labels in _unique(points, finetune_base) if p.key(finetune_base) not in done]
    if not todo:
        return []
    run_id = time.strftime("%Y%m%d-%H%M%S")
    common = {"sweep": name, "run_id": run_id, "mode": "finetune" if finetune_base else "plug", "rounds": rounds,
              "speedup_label": task.speedup_label, **settings}
    ref = _reference(task, batch_size, timing_batches, device, [p for p, _ in todo])
    main = ref.procs.is_main  # under accelerate launch, the other processes only score their share of each pass
    written = []
    if main:
        written.append({**_dense_record(ref, rounds), **common, "key": "dense", "status": "ok", "label": "dense",
                        "labels": ["dense"], "series": "dense", "group": None, "config": None})
        _append(path, written[0])
    for point, labels in tqdm(todo, desc=f"sweep {name}", unit="point", disable=not (progress and main)):
        started = time.perf_counter()
        record = {**common, "key": point.key(finetune_base), "method": point.method, "label": point.label,
                  "labels": labels, "series": point.series, "group": point.group, "config": config_to_dict(point.config),
                  "config_label": point.config.describe(), "finetune": dict(point.finetune) or None}
        try:
            record.update(_measure_point(ref, point, finetune_base, rounds, path.parent, progress), status="ok", error=None)
        except Exception as err:  # a failing point is recorded, the sweep goes on
            message = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            record.update(status="error", error=message)
            tqdm.write(f"pumer-plug: point {point.method} {point.label!r} failed: {message}", file=sys.stderr)
        record["seconds"] = time.perf_counter() - started
        if main:
            _append(path, record)
            written.append(record)
    return written
