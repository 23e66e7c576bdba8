"""The Task interface: every registered task honours it; a task with its own metric runs through compare."""
from __future__ import annotations

import json

import pytest
import torch

from pumer_plug.errors import UserError
from pumer_plug.evaluation.studies.compare import MethodSpec, run_compare
from pumer_plug.evaluation.tasks import TASKS, Predictions, Task, TaskOptions
from pumer_plug.registry import ADAPTERS, METHODS
from tests.test_finetune import TinyTask


@pytest.mark.parametrize("name", TASKS.list())
def test_every_registered_task_names_its_adapter_and_a_config_for_every_method(name):
    task_class = TASKS.get(name)
    assert issubclass(task_class, Task) and task_class.name and task_class.adapter in ADAPTERS
    for method in task_class.default_configs:
        assert method in METHODS


def test_the_builtin_task_refuses_options_it_cannot_use():
    with pytest.raises(UserError, match="does not take --model"):
        TASKS.get("builtin")(TaskOptions(model="/some/checkpoint"))


class ScoredTask(TinyTask):
    """A task whose headline metric is not accuracy: half credit for an answer one class off."""

    metric = "score"

    def metrics(self, predictions: Predictions) -> dict[str, float]:
        credit = [1.0 if o == t else 0.5 if abs(o - t) == 1 else 0.0
                  for o, t in zip(predictions.outputs, predictions.targets)]
        return {"score": sum(credit) / len(credit), **super().metrics(predictions)}


def test_compare_reports_the_tasks_own_metric_and_writes_predictions(tmp_path):
    task = ScoredTask()
    config = task.default_config("pumer")
    rows = run_compare(task, [MethodSpec("pumer", config)], batch_size=8, rounds=1, timing_batches=1,
                       progress=False, predictions_dir=tmp_path)
    model = task.load_model(torch.device("cpu"))
    expected = task.metrics(task.predictions(model, task.batches("test", 8)))["score"]
    assert rows[0]["accuracy"] == pytest.approx(expected) and rows[0]["metric"] == "score"
    lines = (tmp_path / "predictions-pumer.jsonl").read_text().splitlines()
    assert len(lines) == 16 and set(json.loads(lines[0])) == {"index", "output", "target"}
    assert (tmp_path / "predictions-dense.jsonl").exists()


def test_a_method_config_that_does_not_fit_the_model_is_a_user_error(tmp_path):
    from pumer_plug import PumerConfig
    from pumer_plug.evaluation.training.finetune import FinetuneConfig, finetune

    beyond = PumerConfig(reduction_layers=(5,))  # the tiny model has 2 layers
    with pytest.raises(UserError, match="pumer on this model: .*beyond"):
        run_compare(TinyTask(), [MethodSpec("pumer", beyond)], batch_size=8, rounds=1, timing_batches=1, progress=False)
    with pytest.raises(UserError, match="beyond"):
        finetune(TinyTask(), FinetuneConfig(method="pumer", method_config=beyond), tmp_path, progress=False)


def test_the_builtin_task_states_its_default_test_size():
    assert TASKS.get("builtin")().options.num_test_examples == 1000  # recorded with sweep results
    assert TASKS.get("builtin")(TaskOptions(num_test_examples=300)).options.num_test_examples == 300
