"""Training-step memory: forward + backward with the method attached, in compare rows and bench results."""
from __future__ import annotations

import json

import pytest
import torch

import pumer_plug
from pumer_plug.cli import main
from pumer_plug.evaluation.measure import measure_peak_memory, measure_train_step_memory
from pumer_plug.evaluation.studies.compare import MethodSpec, run_compare
from tests.backbones import BACKBONES, METHOD_CONFIGS
from tests.test_cli_eval import TINY_BENCH
from tests.test_finetune import TinyTask


@pytest.mark.parametrize("name", ["vilt", "meter"])
def test_a_training_step_with_pumer_holds_less_memory_and_restores_the_model(name):
    backbone = BACKBONES[name]
    model, batch = backbone.build(), backbone.make_batch()
    config = METHOD_CONFIGS["pumer"][0](backbone.num_layers, backbone.modalities)
    attach = lambda m: pumer_plug.apply(m, method="pumer", config=config)  # noqa: E731
    dense, reduced = measure_train_step_memory(model, batch), measure_train_step_memory(model, batch, attach)
    assert reduced.peak_memory_mib < dense.peak_memory_mib
    assert reduced.weights_memory_mib == dense.weights_memory_mib
    # a training step keeps the activations for backward: more than an inference forward
    assert dense.activation_memory_mib > measure_peak_memory(model, batch).activation_memory_mib
    assert not model.training and all(p.grad is None for p in model.parameters())


def test_compare_rows_carry_training_step_memory():
    task = TinyTask()
    rows = run_compare(task, [MethodSpec("pumer", task.default_config("pumer"))], batch_size=8, rounds=1,
                       timing_batches=1, progress=False)
    dense, pumer = rows
    assert dense["train_memory_reduction"] == 1.0
    assert pumer["train_peak_memory_mib"] > 0 and pumer["train_activation_memory_mib"] > 0
    assert pumer["train_memory_reduction"] == pytest.approx(dense["train_peak_memory_mib"] / pumer["train_peak_memory_mib"])


def test_bench_train_memory_records_both_peaks(tmp_path):
    argv = ["bench", "--model", TINY_BENCH, "--rounds", "1", "--train-memory", "--output", str(tmp_path)]
    assert main(argv) == 0
    result = json.loads((tmp_path / "bench.jsonl").read_text())  # --output is a folder
    for key in ("dense_peak_memory_mib", "reduced_peak_memory_mib", "dense_train_peak_memory_mib",
                "reduced_train_peak_memory_mib"):
        assert result[key] > 0
    assert result["train_memory_reduction"] > 1.0
