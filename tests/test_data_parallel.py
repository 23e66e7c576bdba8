"""Data-parallel accuracy passes (``torchrun`` / ``accelerate launch``): the same predictions and
metrics as one process, gathered once in order; timing, printing and files on the main process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from pumer_plug.cli import main
from pumer_plug.evaluation.parallel import Processes, interleave
from pumer_plug.evaluation.tasks.base import Predictions, Task
from tests import fixtures_benchmarks as fx
from tests.test_benchmark_tasks import METHOD_CONFIGS, save_tiny_vilt

CPU = torch.device("cpu")


class _EchoTask(Task):
    """Predicts each example's target (so the order of a pass is visible in its outputs)."""

    name, adapter = "echo", "vilt"

    def predictions(self, model, batches) -> Predictions:
        result = Predictions()
        for inputs, targets in batches:
            result.outputs += [f"out{t}" for t in targets.tolist()]
            result.targets += targets.tolist()
        return result


def _batches(sizes: list[int]) -> list:
    start, out = 0, []
    for size in sizes:
        out.append(({"x": torch.zeros(size)}, torch.arange(start, start + size)))
        start += size
    return out


def _gathered(shards_of, count: int) -> Predictions:
    """What ``Processes.predictions`` assembles, with the gather done by hand (no process group)."""
    shards = []
    for index in range(count):
        mine = list(shards_of(Processes(index, count, CPU)))
        local = _EchoTask().predictions(None, mine)
        sizes = [len(t) for _, t in mine]
        starts = [sum(sizes[:k]) for k in range(len(sizes))]
        shards.append(([local.outputs[s:s + n] for s, n in zip(starts, sizes)],
                       [local.targets[s:s + n] for s, n in zip(starts, sizes)]))
    return interleave(Predictions, shards)


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7])
def test_shards_gathered_back_equal_one_pass_in_order(count):
    batches = _batches([4, 4, 3, 4, 4, 2])  # uneven, and fewer batches than processes for count 7
    whole = _EchoTask().predictions(None, batches)
    got = _gathered(lambda procs: procs.shard(batches), count)
    assert got.targets == whole.targets == list(range(21))
    assert got.outputs == whole.outputs


def test_a_dataloader_is_sharded_by_batches_without_loading_the_others():
    class Counting(torch.utils.data.Dataset):
        def __init__(self):
            self.read = []

        def __len__(self):
            return 10

        def __getitem__(self, i):
            self.read.append(i)
            return i

    dataset = Counting()
    loader = DataLoader(dataset, batch_size=3, collate_fn=lambda xs: ({"x": torch.tensor(xs)}, torch.tensor(xs)))
    mine = Processes(1, 2, CPU).shard(loader)
    assert [t.tolist() for _, t in mine] == [[3, 4, 5], [9]]
    assert sorted(dataset.read) == [3, 4, 5, 9]  # the other process's examples were never read
    got = _gathered(lambda procs: procs.shard(loader), 2)
    assert got.targets == list(range(10))


def test_a_pass_with_one_output_per_batch_is_refused():
    class PerBatch(_EchoTask):
        def predictions(self, model, batches) -> Predictions:
            result = Predictions()
            for _, targets in batches:
                result.outputs.append("one")
                result.targets.append(int(targets[0]))
            return result

    with pytest.raises(RuntimeError, match="one output per example"):
        Processes(0, 2, CPU).predictions(PerBatch(), None, _batches([3, 3]))


@pytest.mark.parametrize("command, extra", [("bench", ["--model", "vilt-b32"]), ("tune", ["--target-speedup", "1.5"]), ("show", [])])
def test_commands_that_time_or_search_refuse_several_processes(monkeypatch, capsys, command, extra):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([command, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{command} runs in one process" in err[0] and "compare, sweep, finetune" in err[0]


def test_sweep_tuned_refuses_several_processes(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["sweep", "--tuned", "1.5"]) == 2
    assert "sweep --tuned searches in one process" in capsys.readouterr().err


def test_an_indexed_device_is_refused_under_a_launcher(monkeypatch):
    from pumer_plug.errors import UserError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="--device cuda, not --device cuda:1"):
        Processes.current("cuda:1")


# -- end to end under torchrun (2 CPU processes, gloo) ------------------------------------------------
def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "pumer_plug.cli", *args, "--num-threads", "1"]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def vqa(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    root = tmp_path_factory.mktemp("dp")
    data = fx.write_vqav2(root / "vqav2", "train", num_questions=12)
    fx.write_vqav2(data, "val", num_questions=7)  # 7 questions in batches of 2: the last batch is short
    model = save_tiny_vilt(root / "vilt", "ViltForQuestionAnswering", fx.VQA_FIXTURE_ANSWERS)
    pumer = root / "pumer.json"
    pumer.write_text(json.dumps(METHOD_CONFIGS["pumer"]))
    return data, model, ["--config", f"pumer={pumer}"]


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


def test_compare_on_two_processes_equals_one_process(tmp_path, vqa, capsys):
    data, model, config = vqa
    args = ["compare", "--task", "vqav2", "--data-dir", str(data), "--model", str(model), "--methods", "dense,pumer",
            *config, "--batch-size", "2", "--rounds", "1", "--timing-batches", "1"]
    assert main([*args, "--output", str(tmp_path / "one")]) == 0, capsys.readouterr().err
    run = _torchrun([*args, "--output", str(tmp_path / "two")], tmp_path)
    assert run.stdout.count("| dense") == 1  # the main process prints the table, once
    one, two = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert [r["method"] for r in two] == ["dense", "pumer"]  # one row per method: written once
    assert [r["accuracy_processes"] for r in two] == [2, 2] and [r["accuracy_processes"] for r in one] == [1, 1]
    for a, b in zip(one, two):
        assert b["accuracy"] == pytest.approx(a["accuracy"], abs=1e-12)
        assert b["metrics"] == pytest.approx(a["metrics"], abs=1e-12)
        file = Path(a["method"]) / "vqav2_val_results.json"  # the official results file, in question order
        assert (tmp_path / "two" / file).read_text() == (tmp_path / "one" / file).read_text()
        assert len(json.loads((tmp_path / "two" / file).read_text())) == 7


def test_sweep_on_two_processes_equals_one_process(tmp_path, vqa, capsys):
    data, model, _ = vqa
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"name": "tiny", "points": [
        {"method": "pumer", "base": {"reduction_layers": [1]}, "configs": [{"prune_ratio": 0.2}, {"prune_ratio": 0.5}]}]}))
    args = ["sweep", "--task", "vqav2", "--data-dir", str(data), "--model", str(model), "--grid", str(grid),
            "--batch-size", "2", "--rounds", "1", "--timing-batches", "1", "--no-plot"]
    assert main([*args, "--output", str(tmp_path / "one")]) == 0, capsys.readouterr().err
    _torchrun([*args, "--output", str(tmp_path / "two")], tmp_path)
    one, two = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert [r["key"] for r in two] == [r["key"] for r in one] and len(two) == 3  # written once
    assert all(r["status"] == "ok" for r in two)
    assert [r["accuracy"] for r in two] == pytest.approx([r["accuracy"] for r in one], abs=1e-12)


def test_finetune_on_two_processes_scores_the_whole_val_split_once(tmp_path, vqa, capsys):
    data, model, _ = vqa
    args = ["finetune", "--task", "vqav2", "--data-dir", str(data), "--model", str(model), "--method", "pumer",
            "--config", json.dumps(METHOD_CONFIGS["pumer"]), "--epochs", "2", "--train-batch-size", "4",
            "--num-train-examples", "12", "--num-val-examples", "7", "--no-distill"]
    assert main([*args, "--output", str(tmp_path / "one")]) == 0, capsys.readouterr().err
    run = _torchrun([*args, "--output", str(tmp_path / "two")], tmp_path)
    assert run.stdout.count("finetuned pumer") == 1
    one = json.loads((tmp_path / "one" / "finetune.json").read_text())
    two = json.loads((tmp_path / "two" / "finetune.json").read_text())
    assert two["num_processes"] == 2
    # before training both score the same model on the same 7 val questions
    assert two["initial_val_accuracy"] == pytest.approx(one["initial_val_accuracy"], abs=1e-12)
    assert len((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) == 2
