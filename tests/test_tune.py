"""``pumer-plug tune``: meets a FLOPs target, resumes from its study, records failing trials, writes a
config that ``load_config``/``compare`` accept; ``sweep --tuned`` builds points from tuned configs."""
from __future__ import annotations

import json

import pytest

from pumer_plug import PumerConfig, Pumer
from pumer_plug.cli import main
from pumer_plug.evaluation.studies.compare import MethodSpec, run_compare
from pumer_plug.evaluation.studies.tune import run_tune, tuned_grid
from pumer_plug.evaluation.tasks import load_config
from pumer_plug.registry import METHODS
from tests.test_finetune import TinyTask

FAST = dict(num_val_examples=16, batch_size=8, rounds=1, timing_batches=1, progress=False)


def _study(folder):
    import optuna

    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(folder / "study.journal")))
    (summary,) = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage)


def test_tune_meets_a_flops_target_and_writes_a_config_compare_accepts(tmp_path):
    result = run_tune(TinyTask(), "pumer", 1.3, budget=6, output_dir=tmp_path, **FAST)
    assert result.chosen is not None and result.met_target and result.chosen.flops_speedup >= 1.3
    assert [r["method"] for r in result.rows] == ["dense", "pumer"]
    assert result.rows[1]["gflops_per_example"] * 1.3 <= result.rows[0]["gflops_per_example"] * 1.0001
    config = load_config("pumer", str(result.config_path))
    assert config == result.chosen.config
    rows = run_compare(TinyTask(), [MethodSpec("pumer", config)], batch_size=8, rounds=1, timing_batches=1, progress=False)
    assert rows[1]["config"] == config.describe()
    frontier = [json.loads(line) for line in (tmp_path / "frontier.jsonl").read_text().splitlines()]
    assert sum(f["chosen"] for f in frontier) == 1 and all(f["flops_speedup"] >= 1.3 for f in frontier)


def _distinct_configs(trials) -> int:
    return len({json.dumps(t.user_attrs["config"], sort_keys=True) for t in trials})


def test_tune_resumes_from_its_study(tmp_path):
    run_tune(TinyTask(), "smres", 1.2, budget=3, output_dir=tmp_path, evaluate_test=False, **FAST)
    first = _study(tmp_path).trials
    assert _distinct_configs(first) == 3
    run_tune(TinyTask(), "smres", 1.2, budget=3, output_dir=tmp_path, evaluate_test=False, **FAST)
    assert len(_study(tmp_path).trials) == len(first)  # budget already spent: nothing new
    again = run_tune(TinyTask(), "smres", 1.2, budget=5, output_dir=tmp_path, evaluate_test=False, **FAST)
    assert _distinct_configs(_study(tmp_path).trials) == 5 and again.chosen is not None


def test_a_config_drawn_again_reuses_its_result_and_does_not_spend_the_budget(tmp_path, monkeypatch):
    original = Pumer.suggest_config.__func__

    def suggest(cls, trial, num_layers, placement="encoder-layer"):
        config = original(cls, trial, num_layers, placement)
        return PumerConfig(reduction_layers=(0,), prune_ratio=0.5) if trial.number < 3 else config

    monkeypatch.setattr(Pumer, "suggest_config", classmethod(suggest))
    passes = []
    predictions = TinyTask.predictions
    monkeypatch.setattr(TinyTask, "predictions", lambda self, *a, **k: passes.append(1) or predictions(self, *a, **k))
    result = run_tune(TinyTask(), "pumer", 1.01, budget=3, rungs=1, output_dir=tmp_path, evaluate_test=False, **FAST)
    trials = _study(tmp_path).trials
    assert [t.value for t in trials[:3]] == [trials[0].value] * 3  # trials 1 and 2: trial 0's result
    import optuna

    scored = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE and "duplicate_of" not in t.user_attrs]
    assert len(passes) == len(scored)  # one val pass per config scored; none for the two repeats
    assert _distinct_configs(trials) == 3 and len(trials) >= 5  # the budget counts distinct configs
    assert result.counts["repeated (not re-run)"] == 2
    assert len(result.frontier) == _distinct_configs(trials)  # one candidate per config


def test_a_failing_trial_is_recorded_and_the_search_goes_on(tmp_path, monkeypatch):
    original = Pumer.suggest_config.__func__

    def suggest(cls, trial, num_layers, placement="encoder-layer"):
        config = original(cls, trial, num_layers, placement)
        return PumerConfig(reduction_layers=(9,)) if trial.number == 0 else config  # beyond the tiny model's 2 layers

    monkeypatch.setattr(Pumer, "suggest_config", classmethod(suggest))
    result = run_tune(TinyTask(), "pumer", 1.2, budget=4, output_dir=tmp_path, evaluate_test=False, **FAST)
    import optuna

    trials = _study(tmp_path).trials
    assert trials[0].state == optuna.trial.TrialState.FAIL and "beyond" in trials[0].user_attrs["error"]
    assert len(trials) == 4 and any(t.state == optuna.trial.TrialState.COMPLETE for t in trials[1:])
    assert result.counts["fail"] == 1


def test_throughput_measure_confirms_the_best_trials_by_timing(tmp_path):
    result = run_tune(TinyTask(), "pumer", 1.2, measure="throughput", budget=4, confirm=2, output_dir=tmp_path,
                      evaluate_test=False, **FAST)
    timed = [c for c in result.frontier if c.throughput_speedup is not None]
    assert 1 <= len(timed) <= 2 and result.chosen in timed


@pytest.mark.parametrize("method", METHODS.list())
def test_every_method_has_a_search_space_that_builds_valid_configs(method):
    import optuna

    study = optuna.create_study()
    for placement in sorted(METHODS.get(method).placements):
        for _ in range(5):
            trial = study.ask()
            config = METHODS.get(method).suggest_config(trial, 6, placement)
            assert isinstance(config, METHODS.get(method).config_class)
            if placement.startswith("decoder"):  # what the llava adapter accepts
                assert not METHODS.get(method)(config).merges_text
            study.tell(trial, 0.0)


def test_tuned_grid_has_one_point_per_method_and_target(tmp_path):
    grid = tuned_grid(TinyTask(), ["smres"], [1.2, 1.5], tmp_path, budget=2, num_val_examples=16, batch_size=8,
                      progress=False)
    assert [p.group for p in grid.points] == ["tuned 1.2x", "tuned 1.5x"] and grid.name == "figure5-tuned"
    assert (tmp_path / "tune" / "smres-x1.2" / "study.journal").exists()


def test_cli_refuses_a_target_of_one_or_less(capsys):
    assert main(["tune", "--target-speedup", "0.9"]) == 2
    assert "above 1" in capsys.readouterr().err
