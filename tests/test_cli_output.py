"""What a user reads (issue 17): startup without torch, a compare table within 120 columns, one-line
errors naming the file, outputs checked before any work, `list` showing everything."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from pumer_plug.cli import main
from pumer_plug.errors import UserError
from pumer_plug.evaluation import measure
from pumer_plug.evaluation.measure import Variant
from pumer_plug.evaluation.studies import report


def test_the_cli_and_its_parser_import_without_torch():
    code = ("import sys; import pumer_plug.cli as cli; from pumer_plug.cli_parser import build_parser; "
            "build_parser(cli.commands()); "
            "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def _five_method_rows() -> list[dict]:
    names = ["dense", "pumer", "tome", "dynamicvit", "smres"]
    configs = ["-", "layers=2,3,4 k=0.5 r=0.3 t=0", "TomeConfig(r=12, inflection=0.0, reduction_layers=None, "
               "proportional_attention=True)", "layers=1,3,4 rho=0.7", "scale=0.75"]
    variants = [Variant(n, c) for n, c in zip(names, configs)]
    memory = {n: measure.MemoryResult(123.4 - i, 50.0, 50.0, measure.CPU_MEMORY_METHOD) for i, n in enumerate(names)}
    env = measure.environment_record("cpu", torch.float32, 64)
    return report.compare_rows(
        variants, environment=env, accuracy={n: 0.9612 - 0.1 * i for i, n in enumerate(names)},
        throughput={n: 1234.5 * (1 + i) for i, n in enumerate(names)}, memory=memory,
        gflops={n: 1.234 / (1 + i) for i, n in enumerate(names)})


def test_default_compare_table_fits_120_columns_with_five_methods():
    table = report.format_table(_five_method_rows(), references={"question-only prior": 0.318})
    assert max(len(line) for line in table.splitlines()) <= 120
    header = [cell.strip() for cell in table.splitlines()[0].strip("|").split("|")]
    assert header == ["method", "config", "acc", "Δacc", "ex/s", "speed-up", "mem MiB", "GFLOPs"]


def test_wide_table_shows_every_column_and_the_whole_config():
    table = report.format_table(_five_method_rows(), wide=True)
    assert "mem reduction" in table and "latency ms" in table and "proportional_attention=True)" in table


def test_rows_below_the_reference_accuracies_are_flagged():
    rows = _five_method_rows()  # accuracies 96.1, 86.1, 76.1, 66.1, 56.1 %
    references = {"majority answer": 0.2, "question-only prior": 0.7}
    assert report.below_references(rows, references) == ["dynamicvit", "smres"]
    table = report.format_table(rows, references=references)
    assert "66.12% !" in table and "96.12% !" not in table
    note = report.format_references(references, rows)
    assert "below the question-only prior (70.0%)" in note and "dynamicvit, smres" in note


def test_the_memory_note_is_in_plain_words():
    note = report.format_memory_note(_five_method_rows())
    assert "dispatch" not in note and "weights + inputs" in note


@pytest.mark.parametrize("text, expected", [
    ("prune_ratio: 0.2\nreduction_layers: [2, 3\n", "line 3, column 1"),
    ("prune_ratio: 1.5\n", "prune_ratio must be in [0, 1)"),
])
def test_config_file_errors_name_the_file_and_the_place(tmp_path, text, expected):
    from pumer_plug.evaluation.tasks import load_config

    path = tmp_path / "pumer.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        load_config("pumer", str(path))
    assert str(path) in str(info.value) and expected in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("command", [["bench"], ["compare"], ["sweep", "--grid", "figure5"], ["finetune"],
                                     ["plot", "results.jsonl"]])
def test_an_output_that_is_a_file_is_refused_before_any_work(tmp_path, capsys, command):
    taken = tmp_path / "results.jsonl"
    taken.write_text("")
    assert main([*command, "--output", str(taken)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file; --output takes a folder" in err


def test_a_config_beyond_the_model_fails_before_any_evaluation():
    from pumer_plug import PumerConfig
    from pumer_plug.evaluation.studies.compare import MethodSpec, run_compare
    from tests.test_finetune import TinyTask

    class NoEvaluation(TinyTask):
        def predictions(self, model, batches):
            raise AssertionError("evaluated before the configs were checked")

    beyond = PumerConfig(reduction_layers=(0, 7), prune_ratio=0.2, image_merge_ratio=0.3, text_merge_ratio=0.2)
    with pytest.raises(UserError, match="nothing was evaluated"):
        run_compare(NoEvaluation(), [MethodSpec("pumer", beyond)], batch_size=4, progress=False)


def test_list_shows_methods_with_fields_and_presets_adapters_tasks_and_bench_setups(capsys):
    from pumer_plug.registry import ADAPTERS, BENCH_MODELS, METHODS, TASKS

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in [*METHODS.list(), *ADAPTERS.list(), *TASKS.list(), *BENCH_MODELS.list()]:
        assert f"  {name}" in out
    assert "prune_ratio=0.1" in out and "preset vilt-vqa" in out and "keep_ratio=0.7" in out


def test_list_fits_120_columns_and_names_every_registered_thing(capsys):
    import pumer_plug
    from pumer_plug.cli import main
    from pumer_plug.registry import BENCH_MODELS, TASKS

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 120
    for name in [*pumer_plug.list_methods(), *pumer_plug.list_adapters(), *TASKS.list(), *BENCH_MODELS.list()]:
        assert f"  {name}" in out
    assert "``" not in out


def test_output_cut_short_by_its_reader_is_no_error(monkeypatch, tmp_path, capsys):
    """`pumer-plug list | head -1`: the closed pipe ends the command quietly (exit 0, nothing on stderr)."""
    import io

    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    closed = ClosedPipe()
    closed.fileno = (tmp_path / "sink").open("w").fileno  # main() points the descriptor at /dev/null
    monkeypatch.setattr(sys, "stdout", closed)
    assert main(["list"]) == 0
    assert capsys.readouterr().err == ""


def test_memory_note_keeps_to_120_columns():
    from pumer_plug.evaluation.measure import CPU_MEMORY_METHOD, CUDA_MEMORY_METHOD
    from pumer_plug.evaluation.studies.report import format_memory_note

    note = format_memory_note([{"memory_method": CPU_MEMORY_METHOD}, {"memory_method": CUDA_MEMORY_METHOD}])
    assert "counted by PyTorch" in note and max(len(line) for line in note.splitlines()) <= 120


def test_show_refuses_an_output_file_before_any_work(tmp_path, capsys):
    target = tmp_path / "afile"
    target.write_text("x")
    assert main(["show", "--method", "pumer", "--output", str(target), "--cache-dir", str(tmp_path / "no-cache")]) == 2
    assert "is a file; --output takes a folder" in capsys.readouterr().err
    assert not (tmp_path / "no-cache").exists()  # refused before the task (and its model) was touched


@pytest.mark.parametrize("command", [["compare", "--config", "pumer=nosuch-preset"],
                                     ["sweep", "--grid", "figure5", "--task", "nosuch-task"]])
def test_a_refused_run_leaves_no_empty_output_folder(tmp_path, capsys, command):
    output = tmp_path / "new" / "out"
    assert main([*command, "--output", str(output)]) == 2
    assert "nosuch" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    assert tmp_path.exists()  # folders that were there stay


def test_sweep_list_points_fits_120_columns(capsys):
    from pumer_plug.evaluation.studies.sweep import PRESETS

    for name in PRESETS:
        assert main(["sweep", "--grid", name, "--list-points"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) > 1 and max(map(len, lines)) <= 120, name
