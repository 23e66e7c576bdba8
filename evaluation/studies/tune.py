"""``pumer-plug tune``: the most accurate config of a method that meets a speed target.

Optuna searches the method's knobs (``ReductionMethod.suggest_config``: PuMer's reduction layers
and ratios, ToMe's r and schedule, DynamicViT's layers and keep ratio, SmRes' scale) on a subset of
the **val** split, in the method's search space at the place where it acts on the task's backbone
(``placement``: PuMer merges no text between decoder layers). A trial is cheap: its FLOPs speed-up
over the dense model (one forward of a val batch, ``FlopCounterMode``; on a generative task that
forward is the prefill, so the gate is on prefill FLOPs) is the fast proxy of the target; a trial below ``target * flops_margin`` is
pruned before any accuracy is computed. The val accuracy of the others is accumulated over
``rungs`` chunks of the subset and reported after each, so Optuna's successive-halving pruner stops
unpromising trials early. A trial that fails is recorded (state FAIL, its error in the user
attribute ``error``) and the search goes on. The study lives in ``study.journal`` in the output
folder, so re-running resumes it: ``--budget`` counts every trial the study has finished.

With ``--measure throughput`` the best trials are then confirmed by throughput measured
interleaved with the dense model (val batches, warm-up dropped, median of rounds); the most
accurate one that reaches the target wins. The chosen config is evaluated once on the **test**
split exactly as ``pumer-plug compare`` does (a generative task's decoder rows) and written as ``<method>-tuned.json``, a file
``compare --config`` accepts.

Example:
    >>> result = run_tune(get_task("builtin"), "pumer", target_speedup=1.5, output_dir="results/tune/pumer-1.5")
    >>> result.config, result.rows[1]["accuracy_change_points"]
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from pumer_plug.errors import UserError
from pumer_plug.evaluation.measure import Variant, measure_flops, measure_throughput
from pumer_plug.evaluation.studies.compare import MethodSpec, run_compare
from pumer_plug.evaluation.tasks.base import (Predictions, Task, attach_method, check_methods_fit, load_config,
                                             on_device)
from pumer_plug.evaluation.training.finetune_config import config_to_dict
from pumer_plug.method import ReductionMethod
from pumer_plug.placement import placement
from pumer_plug.registry import ADAPTERS, METHODS

MEASURES = ("flops", "throughput")
STUDY_FILE = "study.journal"


@dataclass
class Candidate:
    """A finished trial: its config, val accuracy and speed-ups over the dense model."""

    number: int
    config: Any
    val_accuracy: float
    flops_speedup: float
    throughput_speedup: float | None = None


@dataclass
class TuneResult:
    """What :func:`run_tune` chose and where it wrote it.

    Attributes:
        chosen: the winning trial (None: no trial met the target).
        frontier: every completed trial, most accurate first (throughput-confirmed ones carry their speed-up).
        rows: ``compare`` rows of the dense model and the chosen config on the test split.
        config_path: the chosen config as a file ``compare --config`` accepts.
        met_target: whether the chosen config reaches the target in the chosen measure.
    """

    method: str
    target_speedup: float
    measure: str
    chosen: Candidate | None
    frontier: list[Candidate]
    dense_val_accuracy: float
    rows: list[dict[str, Any]] = field(default_factory=list)
    config_path: Path | None = None
    met_target: bool = False
    counts: dict[str, int] = field(default_factory=dict)


def _optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def open_study(output_dir: Path, name: str, seed: int = 0) -> Any:
    """The Optuna study ``name`` in ``output_dir/study.journal`` (created or resumed): TPE sampler,
    successive-halving pruner, maximising val accuracy."""
    optuna = _optuna()
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    output_dir.mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(output_dir / STUDY_FILE)))
    return optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True,
                               sampler=optuna.samplers.TPESampler(seed=seed),
                               pruner=optuna.pruners.SuccessiveHalvingPruner())


class _Objective:
    """One trial: draw a config, prune it on FLOPs, then score val accuracy rung by rung."""

    def __init__(self, task: Task, model: torch.nn.Module, method: str, num_layers: int, val: list,
                 dense_gflops: float, gate: float, rungs: int, placement: str = "encoder-layer"):
        self.task, self.model, self.method, self.num_layers = task, model, method, num_layers
        self.placement = placement
        self.val, self.dense_gflops, self.gate = val, dense_gflops, gate
        self.chunks = [val[i::rungs] for i in range(min(rungs, len(val)))]

    def __call__(self, trial: Any) -> float:
        optuna = _optuna()
        try:
            return self._run(trial, optuna)
        except optuna.TrialPruned:
            raise
        except Exception as err:  # recorded on the trial; study.optimize(catch=...) goes on
            trial.set_user_attr("error", f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            raise

    def _run(self, trial: Any, optuna: Any) -> float:
        config = METHODS.get(self.method).suggest_config(trial, self.num_layers, self.placement)
        trial.set_user_attr("config", config_to_dict(config))
        earlier = _same_config(trial, optuna)
        if earlier is not None:  # the sampler drew a config already scored: reuse its result, no second pass
            trial.set_user_attr("duplicate_of", earlier.number)
            for key in ("flops_speedup", "error"):
                if key in earlier.user_attrs:
                    trial.set_user_attr(key, earlier.user_attrs[key])
            if earlier.state == optuna.trial.TrialState.COMPLETE:
                return earlier.value
            raise optuna.TrialPruned(f"same config as trial {earlier.number}, which did not complete")
        attach = lambda model: attach_method(model, self.task.adapter, self.method, config)  # noqa: E731
        speedup = self.dense_gflops / measure_flops(self.model, self.val[0][0], attach)
        trial.set_user_attr("flops_speedup", speedup)
        if speedup < self.gate:
            raise optuna.TrialPruned(f"FLOPs speed-up {speedup:.2f}x below {self.gate:.2f}x")
        merged = Predictions()
        with attach_method(self.model, self.task.adapter, self.method, config):
            for step, chunk in enumerate(self.chunks):
                part = self.task.predictions(self.model, chunk)
                merged.outputs += part.outputs
                merged.targets += part.targets
                accuracy = self.task.metrics(merged)[self.task.metric]
                trial.report(accuracy, step)
                if step < len(self.chunks) - 1 and trial.should_prune():
                    raise optuna.TrialPruned(f"val accuracy {accuracy:.3f} after rung {step}")
        return accuracy


def _config_key(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True)


def _same_config(trial: Any, optuna: Any) -> Any:
    """The first finished, not itself duplicate, trial of ``trial``'s study with the same config; None if none."""
    key = _config_key(trial.user_attrs["config"])
    for t in trial.study.get_trials(deepcopy=False):
        if (t.number != trial.number and t.state.is_finished() and "duplicate_of" not in t.user_attrs
                and "config" in t.user_attrs and _config_key(t.user_attrs["config"]) == key):
            return t
    return None


def _distinct_finished(study: Any) -> int:
    """Finished trials that drew a config no earlier trial had (the ones ``--budget`` counts)."""
    return sum(t.state.is_finished() and "duplicate_of" not in t.user_attrs for t in study.trials)


def candidates(study: Any, method: str) -> list[Candidate]:
    """Completed trials, most accurate first (ties: faster first), one per distinct config."""
    optuna = _optuna()
    seen, out = set(), []
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    for t in sorted(trials, key=lambda t: (-t.value, -t.user_attrs["flops_speedup"], t.number)):
        key = json.dumps(t.user_attrs["config"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(Candidate(t.number, load_config(method, t.user_attrs["config"]), t.value, t.user_attrs["flops_speedup"]))
    return out


def confirm_throughput(task: Task, model: torch.nn.Module, method: str, found: Sequence[Candidate], batches: list,
                       rounds: int) -> None:
    """Measures the throughput speed-up of ``found`` interleaved with the dense model (sets ``throughput_speedup``)."""
    variants = [Variant("dense", "-", None)]
    for c in found:
        variants.append(Variant(f"trial-{c.number}", c.config.describe(),
                                lambda m, cfg=c.config: attach_method(m, task.adapter, method, cfg)))
    timing = measure_throughput(model, batches, variants, rounds=rounds, warmup=1)
    dense = timing["dense"].throughput_per_s
    for c in found:
        c.throughput_speedup = timing[f"trial-{c.number}"].throughput_per_s / dense


def run_tune(task: Task, method: str, target_speedup: float, *, measure: str = "flops", budget: int = 40,
             output_dir: str | Path = "results/tune", num_val_examples: int = 256, batch_size: int = 64,
             rungs: int = 4, confirm: int = 6, flops_margin: float | None = None, rounds: int = 3,
             timing_batches: int = 2, device: str = "cpu", seed: int = 0, progress: bool = True,
             evaluate_test: bool = True) -> TuneResult:
    """Searches ``method``'s config for ``target_speedup`` on val, evaluates the winner on test (see module docstring).

    Args:
        measure: ``"flops"`` (FLOPs speed-up meets the target) or ``"throughput"`` (confirmed by timing).
        budget: distinct configs the study should have tried in all (resumed trials count; a config
            the sampler draws again reuses the earlier result and does not count).
        flops_margin: the FLOPs gate is ``target_speedup * flops_margin``; default 1.0 for ``flops``,
            1.1 for ``throughput`` (a reduction's FLOPs speed-up exceeds its measured one on CPUs).
        confirm: with ``throughput``, how many of the most accurate trials are timed.

    Raises:
        UserError: an unknown measure or method, a method without a search space, a target <= 1.
    """
    if measure not in MEASURES:
        raise UserError(f"--measure must be one of {', '.join(MEASURES)}, got {measure!r}")
    if target_speedup <= 1.0:
        raise UserError(f"--target-speedup must be above 1, got {target_speedup}")
    method_cls = METHODS.get(method)
    if not _has_search_space(method):
        raise UserError(f"method {method!r} defines no search space (ReductionMethod.suggest_config)")
    output = Path(output_dir)
    dev = torch.device(device)
    model = task.load_model(dev).eval()
    adapter = ADAPTERS.get(task.adapter)(model)
    where = placement(adapter, method_cls)  # the method's search space there (PuMer: no text merging on decoders)
    val = list(on_device(task.batches("val", batch_size, num_val_examples), dev, torch.float32))
    dense_gflops = measure_flops(model, val[0][0])  # one forward: on a generative task, the prefill
    dense_val = task.accuracy(model, val)
    gate = target_speedup * (flops_margin if flops_margin is not None else (1.1 if measure == "throughput" else 1.0))
    study = open_study(output, f"{task.name}-{method}-x{target_speedup:g}-{measure}-n{num_val_examples}", seed)
    objective = _Objective(task, model, method, adapter.num_layers, val, dense_gflops, gate, rungs, where)
    draws = 0  # a small search space may hold fewer than `budget` configs: stop drawing after 3 x budget
    while (remaining := budget - _distinct_finished(study)) > 0 and draws < 3 * budget:
        study.optimize(objective, n_trials=remaining, catch=(Exception,), show_progress_bar=progress)
        draws += remaining
    found = candidates(study, method)
    chosen = found[0] if found else None
    if measure == "throughput" and found:
        confirm_throughput(task, model, method, found[:confirm], [x for x, _ in val[:timing_batches]], rounds)
        met = [c for c in found[:confirm] if c.throughput_speedup >= target_speedup]
        chosen = met[0] if met else max(found[:confirm], key=lambda c: c.throughput_speedup)
    met_target = chosen is not None and (chosen.throughput_speedup if measure == "throughput" else chosen.flops_speedup) >= target_speedup
    distinct = [t for t in study.trials if "duplicate_of" not in t.user_attrs]
    counts = {s.name.lower(): sum(t.state == s for t in distinct) for s in _optuna().trial.TrialState}
    counts["repeated (not re-run)"] = len(study.trials) - len(distinct)
    result = TuneResult(method, target_speedup, measure, chosen, found, dense_val, met_target=met_target,
                        counts={k: v for k, v in counts.items() if v})
    _write_summary(output, result)
    if chosen is None:
        return result
    result.config_path = output / f"{method}-tuned.json"
    result.config_path.write_text(json.dumps(config_to_dict(chosen.config), indent=2) + "\n")
    if evaluate_test:
        del model
        result.rows = compare_on_test(task, [MethodSpec(method, chosen.config)], batch_size=batch_size, device=device,
                                      rounds=rounds, timing_batches=timing_batches, progress=progress)
    return result


def compare_on_test(task: Task, specs: Sequence[MethodSpec], **options: Any) -> list[dict[str, Any]]:
    """``pumer-plug compare``'s rows for ``specs`` on ``task``'s test split: for a generative task
    (``Task.generates``) its decoder rows (time to first token, decode tokens/s, KV cache; CPU float32)."""
    if not task.generates:
        return run_compare(task, specs, **options)
    from pumer_plug.evaluation.studies.decoder_compare import run_decoder_compare

    if torch.device(options.get("device", "cpu")).type != "cpu":
        raise UserError(f"task {task.name!r} is compared on the CPU in float32 (got --device {options['device']})")
    return run_decoder_compare(task, specs, batch_size=options.get("batch_size", 32), rounds=options.get("rounds", 5),
                               progress=options.get("progress", True))


def _write_summary(output: Path, result: TuneResult) -> None:
    """``frontier.jsonl``: every completed trial with its val accuracy and speed-ups (the frontier tried)."""
    lines = [json.dumps({"trial": c.number, "config": config_to_dict(c.config), "val_accuracy": c.val_accuracy,
                         "flops_speedup": c.flops_speedup, "throughput_speedup": c.throughput_speedup,
                         "chosen": result.chosen is c}) for c in result.frontier]
    (output / "frontier.jsonl").write_text("".join(line + "\n" for line in lines))


def format_result(result: TuneResult) -> str:
    """Lines that say what the search found, for the terminal."""
    c = result.chosen
    counts = ", ".join(f"{v} {k}" for k, v in result.counts.items())
    lines = [f"tuned {result.method} for {result.target_speedup:g}x ({result.measure}): trials {counts}; "
             f"dense val accuracy {100 * result.dense_val_accuracy:.2f}%"]
    if c is None:
        lines.append(f"no trial reached a {result.target_speedup:g}x FLOPs speed-up; raise --budget or lower the target")
        return "\n".join(lines)
    speed = f"{c.flops_speedup:.2f}x FLOPs" + ("" if c.throughput_speedup is None else f", {c.throughput_speedup:.2f}x throughput")
    lines.append(f"chosen: trial {c.number}: {c.config.describe()}: val accuracy {100 * c.val_accuracy:.2f}%, {speed}"
                 + ("" if result.met_target else f" (below the {result.target_speedup:g}x target: the fastest confirmed trial)"))
    return "\n".join(lines)


def tune_many(task: Task, methods: Sequence[str], targets: Sequence[float], output_dir: str | Path,
              **options: Any) -> list[tuple[str, float, TuneResult]]:
    """Tunes every method at every target (``sweep --tuned``), each in its own study folder, val only."""
    results = []
    for method in methods:
        for target in tqdm(targets, desc=f"tune {method}", disable=not options.get("progress", True)):
            folder = Path(output_dir) / "tune" / f"{method}-x{target:g}"
            try:
                result = run_tune(task, method, target, output_dir=folder, evaluate_test=False, **options)
            except UserError:
                raise
            except Exception as err:  # one method's failure does not end the others
                print(f"pumer-plug: tuning {method} for {target:g}x failed: {type(err).__name__}: {err}", file=sys.stderr)
                continue
            results.append((method, target, result))
    return results


def _has_search_space(method: str) -> bool:
    return METHODS.get(method).suggest_config.__func__ is not ReductionMethod.suggest_config.__func__


def tunable_methods(task: Task, methods: Sequence[str] | None = None) -> list[str]:
    """``methods`` checked against the task's model before any search, or (None) every registered
    method with a search space that attaches to it (e.g. pumer, tome, dynamicvit, smres on the
    built-in ViLT; pumer, fastv, random, pool on the built-in LLaVA).

    Raises:
        UserError: one of ``methods`` has no search space or does not fit the task's model (naming it).
    """
    model = task.load_model(torch.device("cpu")).eval()
    if methods is None:
        fitting = []
        for name in METHODS.list():
            try:
                check_methods_fit(model, task.adapter, [(name, task.default_config(name))])
            except (UserError, ValueError):
                continue
            if _has_search_space(name):
                fitting.append(name)
        return fitting
    for name in methods:
        if not _has_search_space(name):
            raise UserError(f"method {name!r} defines no search space (ReductionMethod.suggest_config)")
    check_methods_fit(model, task.adapter, [(name, task.default_config(name)) for name in methods])
    return list(methods)


def tuned_grid(task: Task, methods: Sequence[str] | None, targets: Sequence[float], output_dir: str | Path,
               **options: Any) -> Any:
    """A sweep grid of each method tuned at each target (``sweep --tuned``: Figure 5 from tuned points);
    ``methods`` None: every method that fits the task's model (:func:`tunable_methods`).

    The studies live in ``output_dir/tune/<method>-x<target>/``, so a re-run resumes them and the
    sweep then skips points it already measured.

    Raises:
        UserError: a method does not fit the task's model (before any search), or no method reached a target.
    """
    from pumer_plug.evaluation.studies.sweep import Grid, SweepPoint

    methods = tunable_methods(task, methods)
    points = []
    for method, target, result in tune_many(task, methods, targets, output_dir, **options):
        if result.chosen is None:
            print(f"pumer-plug: no {method} config reached {target:g}x; left out of the sweep", file=sys.stderr)
            continue
        series = METHODS.get(method).display_name or method
        points.append(SweepPoint(method, result.chosen.config, f"{series} tuned {target:g}x ({result.chosen.config.describe()})",
                                 series, group=f"tuned {target:g}x"))
    if not points:
        raise UserError("no method reached any --tuned target; nothing to sweep")
    return Grid("figure5-tuned", points)
