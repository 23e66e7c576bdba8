"""Sweeps (resume, failing points, grid errors), the Pareto front and plots, and the new CLI commands."""
from __future__ import annotations

import json

import pytest

from pumer_plug.cli import main
from pumer_plug.errors import UserError
from pumer_plug.evaluation.studies.plot import pareto_front, plot_results
from pumer_plug.evaluation.studies.sweep import PRESETS, load_grid, parse_grid, read_records, run_sweep
from tests.test_finetune import TinyTask

FAST = dict(batch_size=8, rounds=1, timing_batches=1, progress=False)


def pumer_grid(*prune_ratios: float, layers=(0, 1)) -> list:
    block = {"method": "pumer", "base": {"reduction_layers": list(layers), "image_merge_ratio": 0.2},
             "vary": {"prune_ratio": list(prune_ratios)}}
    return parse_grid({"points": [block]}, "test grid").points


def test_rerunning_skips_finished_points_and_measures_only_new_ones(tmp_path):
    results = tmp_path / "results.jsonl"
    first = run_sweep(TinyTask(), pumer_grid(0.1, 0.3), results, **FAST)
    assert [r["key"] for r in first][0] == "dense" and all(r["status"] == "ok" for r in first) and len(first) == 3
    point = first[1]
    assert point["config"]["prune_ratio"] == 0.1 and point["throughput_increase"] > 0 and 0 <= point["accuracy"] <= 1
    assert point["peak_memory_mib"] > 0 and point["gflops_per_example"] < first[0]["gflops_per_example"]
    assert run_sweep(TinyTask(), pumer_grid(0.1, 0.3), results, **FAST) == []
    again = run_sweep(TinyTask(), pumer_grid(0.3, 0.1, 0.2), results, **FAST)
    assert [r.get("config", {}) and r["config"]["prune_ratio"] for r in again[1:]] == [0.2]
    assert len(read_records(results)) == 5


def test_results_of_another_model_or_subset_are_never_reused(tmp_path):
    """Resuming is keyed on what was measured: a re-run on another model or ``--limit`` is refused."""
    import dataclasses

    results = tmp_path / "results.jsonl"
    run_sweep(TinyTask(), pumer_grid(0.1), results, **FAST)
    for change in ({"model": "another-model"}, {"limit": 5}, {"data_dir": "other-data"}):
        task = TinyTask()
        object.__setattr__(task, "options", dataclasses.replace(task.options, **change))
        with pytest.raises(UserError, match="measured with other settings"):
            run_sweep(task, pumer_grid(0.1), results, **FAST)


def test_a_config_beyond_the_model_stops_the_sweep_before_anything_is_measured(tmp_path):
    points = pumer_grid(0.1) + pumer_grid(0.1, layers=(5,))  # layer 5 is beyond the tiny model's 2 layers
    with pytest.raises(UserError, match="beyond .* nothing was evaluated") as info:
        run_sweep(TinyTask(), points, tmp_path / "results.jsonl", **FAST)
    assert str(info.value).startswith(f"sweep point {points[-1].label!r}: ")  # names the grid's point
    assert not (tmp_path / "results.jsonl").exists() or (tmp_path / "results.jsonl").read_text() == ""


def test_a_failing_point_records_its_error_and_the_sweep_goes_on(tmp_path, monkeypatch):
    from pumer_plug.evaluation.studies import sweep

    measure, calls = sweep._measure_point, []

    def fails_first(ref, point, *args):
        calls.append(point)
        if len(calls) == 1:
            raise RuntimeError("out of memory (simulated)")
        return measure(ref, point, *args)

    monkeypatch.setattr(sweep, "_measure_point", fails_first)
    points = pumer_grid(0.1, layers=(1,)) + pumer_grid(0.1)
    records = run_sweep(TinyTask(), points, tmp_path / "results.jsonl", **FAST)
    failed, ok = records[1], records[2]
    assert failed["status"] == "error" and "RuntimeError" in failed["error"] and "simulated" in failed["error"]
    assert ok["status"] == "ok" and ok["accuracy"] is not None
    retried = run_sweep(TinyTask(), points, tmp_path / "results.jsonl", **FAST)  # failed points are retried
    assert [r["status"] for r in retried] == ["ok", "ok"]


@pytest.mark.parametrize("text, expected", [
    ("points:\n  - method: nosuch\n", "points[0]: unknown method 'nosuch'"),
    ("points:\n  - method: pumer\n    vary: {prune_ratio: 0.1}\n", "points[0]: 'vary' must map"),
    ("points:\n  - method: pumer\n    vary: {prune_ration: [0.1]}\n", "points[0]: pumer config: unknown PumerConfig field(s) ['prune_ration']"),
    ("points:\n  - method: pumer\n    base: {prune_ratio: 1.5}\n", "points[0]: pumer config: PumerConfig.prune_ratio must be in [0, 1)"),
    ("points:\n  - method: pumer\n    finetune: {epochs: 0}\n", "points[0]: FinetuneConfig.epochs must be an int >= 1"),
    ("points: [\n", "cannot parse grid file"),
    ("name: x\n", "expected a mapping with a non-empty 'points' list"),
])
def test_grid_file_errors_are_one_clear_line(tmp_path, capsys, text, expected):
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        load_grid(str(path))
    assert expected in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)
    assert main(["sweep", "--grid", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pumer-plug: error: ") and expected in err


def test_presets_expand_to_the_papers_studies():
    grids = {name: load_grid(name) for name in PRESETS}
    table3 = grids["table3"].points
    assert [p.label for p in table3][1:] == ["w/o text-informed image pruning", "w/o modality-aware merging", "w/o distillation"]
    assert table3[1].config.prune_ratio == 0 and table3[2].config.text_merge_ratio == 0
    assert table3[3].key() == table3[0].key() and table3[3].key(finetune=_ft()) != table3[0].key(finetune=_ft())
    assert {p.method for p in grids["figure5"].points} == {"pumer", "tome", "dynamicvit"}
    assert [p.config.reduction_layers for p in grids["table4"].points][-1] == (1, 2, 3, 4)
    assert all(max(p.config.reduction_layers, default=0) < 6 for g in grids.values() for p in g.points if hasattr(p.config, "reduction_layers") and p.config.reduction_layers)


def _ft():
    from pumer_plug.evaluation.training.finetune import FinetuneConfig

    return FinetuneConfig(epochs=1)


def test_pareto_front_of_a_hand_example():
    points = [(1.0, 80.0), (1.5, 79.0), (1.4, 78.0), (2.0, 70.0), (1.8, 70.0), (2.0, 65.0), (1.5, 79.0)]
    assert pareto_front(points) == [0, 1, 3]
    assert pareto_front([]) == []


def _record(key, method, label, accuracy, increase, **extra):
    return {"key": key, "status": "ok", "method": method, "label": label, "labels": [label], "series": method,
            "accuracy": accuracy, "throughput_increase": increase, "memory_reduction": increase * 0.9,
            "gflops_per_example": 1.0 / increase, "task": "tiny", "rounds": 1, "mode": "plug", **extra}


def _plotted(tmp_path, sweep):
    pumer = {"reduction_layers": [1, 2], "prune_ratio": 0.1, "image_merge_ratio": 0.3, "text_merge_ratio": 0.2}
    records = [_record("dense", "dense", "dense", 0.80, 1.0),
               _record("p1", "pumer", "PuMer", 0.79, 1.7, config=pumer, group="ratios"),
               _record("p2", "pumer", "PuMer k=0.3", 0.75, 2.1, config={**pumer, "prune_ratio": 0.3}, group="ratios"),
               _record("t1", "tome", "ToMe r=8", 0.70, 1.5, config={"r": 8}),
               {"key": "t2", "status": "error", "method": "tome", "label": "broken", "error": "ValueError: x"}]
    tmp_path.mkdir(parents=True, exist_ok=True)
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps({**r, "sweep": sweep}) + "\n" for r in records))
    return plot_results(results)


def test_plot_writes_the_figure_and_the_table_of_its_grid(tmp_path):
    paths = _plotted(tmp_path / "t3", "table3")
    assert set(paths) == {"png", "svg", "table3"}
    assert paths["png"].stat().st_size > 10_000 and paths["svg"].read_text().startswith("<?xml")
    table3 = paths["table3"].read_text()
    assert "| PuMer " in table3 and "79.00 (-1.00)" in table3 and "broken" not in table3
    table4 = _plotted(tmp_path / "t4", "table4")["table4"].read_text()
    assert "Reduction Layers" in table4 and "| ratios " in table4 and "ToMe" not in table4


def test_a_custom_grid_writes_a_plain_table_not_the_papers(tmp_path):
    paths = _plotted(tmp_path, "my-grid")
    assert set(paths) == {"png", "svg", "table"} and not (tmp_path / "table4.md").exists()
    assert "| ToMe r=8 " in paths["table"].read_text() and "Choice" not in paths["table"].read_text()


@pytest.mark.parametrize("command", ["finetune", "sweep", "plot"])
def test_help_of_each_new_command(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0 and f"usage: pumer-plug {command}" in capsys.readouterr().out


@pytest.mark.parametrize("argv, expected", [
    (["finetune", "--method", "nosuch"], "unknown method(s) ['nosuch']"),
    (["finetune", "--method", "none", "--config", "vilt-vqa"], "--config needs a reduction --method"),
    (["sweep", "--grid", "nosuch"], "'nosuch' is neither a sweep preset"),
    (["plot", "missing.jsonl"], "no results file missing.jsonl"),
])
def test_bad_values_exit_2_with_one_line(argv, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err


@pytest.mark.parametrize("argv, option", [(["finetune", "--epochs", "0"], "--epochs"),
                                          (["sweep", "--grid", "table3", "--rounds", "x"], "--rounds"),
                                          (["plot", "r.jsonl", "--annotate", "maybe"], "--annotate")])
def test_bad_options_exit_2_naming_the_option(argv, option, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and lines[-1].startswith(f"pumer-plug {argv[0]}: error: argument {option}")


@pytest.mark.parametrize("argv", [["compare", "--batch-size", "0"], ["train", "--seed", "-3"], ["nope"]])
def test_argument_errors_are_one_line_naming_the_problem(argv, capsys):
    from pumer_plug.cli import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1 and "error:" in err and "--help" in err


def test_our_warnings_print_as_one_line_during_a_command(capsys, monkeypatch):
    import warnings

    from pumer_plug import cli

    def warn(args):
        warnings.warn("pumer-plug: cache is unusable (reason); retraining", stacklevel=2)
        return 0

    monkeypatch.setattr(cli, "cmd_list", warn)
    before = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert cli.main(["list"]) == 0
    assert capsys.readouterr().err == "pumer-plug: cache is unusable (reason); retraining\n"
    assert warnings.showwarning is before


def test_default_labels_name_the_method_once():
    grid = parse_grid({"points": [{"method": "tome", "vary": {"r": [12]}}, {"method": "pumer", "base": "vilt-ve"}]}, "test")
    assert [p.label for p in grid.points] == ["ToMe r=12", "PuMer layers=2,4,6,8 k=0.1 r=0.3 t=0.2"]


def test_the_documented_example_grid_loads():
    from pathlib import Path

    from pumer_plug.evaluation.studies.sweep import load_grid

    grid = load_grid(str(Path(__file__).resolve().parents[1] / "docs" / "grids" / "example.yaml"))
    assert grid.name == "example" and len(grid.points) == 8
    assert {p.method for p in grid.points} == {"pumer", "dynamicvit", "smres"}


def test_point_labels_stay_inside_the_axes_at_the_extremes():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from pumer_plug.evaluation.studies.plot import tradeoff_figure

    long = "PuMer layers=0,1,2,3,4,5 k=0.2 r=0.5 t=0.2 prop-attn"
    points = [_record("fast", "pumer", long, 0.31, 3.9),          # rightmost and lowest
              _record("best", "tome", "ToMe r=16 inflection=-1 layers=0,1,2,3", 0.99, 3.8),  # top right
              _record("slow", "smres", "SmRes scale=0.95 multiple_of=32", 0.97, 1.02),     # top left
              _record("mid", "dynamicvit", "DynamicViT layers=1,2,3 rho=0.7", 0.60, 2.0)]
    figure = tradeoff_figure(_record("dense", "dense", "dense", 0.98, 1.0), points, annotate=True)
    renderer = FigureCanvasAgg(figure).get_renderer()
    figure.draw(renderer)
    axes = figure.axes[0]
    inside_figure, inside_axes = figure.bbox, axes.get_window_extent(renderer)
    annotations = [child for child in axes.get_children() if type(child).__name__ == "Annotation"]
    assert len(annotations) == len(points)
    for annotation in annotations:
        box = annotation.get_window_extent(renderer)
        for frame in (inside_figure, inside_axes):
            assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, \
                (annotation.get_text(), box, frame)


def test_plot_names_a_compare_results_file_as_not_a_sweeps(tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps({"method": "dense", "accuracy": 0.9, "throughput_per_s": 10.0}) + "\n")
    assert main(["plot", str(results), "--output", str(tmp_path / "fig")]) == 2
    assert "is not a sweep results file" in capsys.readouterr().err


def test_sweep_warns_when_a_speedup_exceeds_the_flops_reduction(tmp_path, capsys, monkeypatch):
    import pumer_plug.evaluation.studies.sweep as sweep

    def fake_run_sweep(task, points, results, **kwargs):  # timings as a disturbed run gave them (helper trial)
        records = [{"method": None, "label": "dense", "labels": ["dense"], "status": "ok", "accuracy": 0.94,
                    "throughput_increase": 1.0, "flops_ratio": 1.0},
                   {"method": "pumer", "label": "PuMer keep 16", "status": "ok", "accuracy": 0.87,
                    "throughput_increase": 9.14, "flops_ratio": 0.456},
                   {"method": "pumer", "label": "PuMer keep 36", "status": "ok", "accuracy": 0.93,
                    "throughput_increase": 1.6, "flops_ratio": 0.6}]
        results.write_text("".join(json.dumps(r) + "\n" for r in records))
        return records

    monkeypatch.setattr(sweep, "run_sweep", fake_run_sweep)
    assert main(["sweep", "--grid", "figure5", "--no-plot", "--output", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    warning = [line for line in out.splitlines() if line.startswith("warning: speed-up above")]
    assert len(warning) == 1 and "PuMer keep 16 9.14x vs 2.19x fewer FLOPs" in warning[0]
    assert "PuMer keep 36" not in warning[0]
