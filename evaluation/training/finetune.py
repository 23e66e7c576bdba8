"""``pumer-plug finetune``: finetunes a model with a token-reduction method attached.

PuMer Sec. 4.3 / Appendix A.1: the reduced model is finetuned like the original one (20 epochs,
early stopping with a patience of 5 on val accuracy) plus a knowledge-distillation loss from the
original finetuned model. The released code (csarron/PuMer ``conf/run.yaml``, ``task_base.py``)
uses AdamW at lr 1e-4, weight decay 0.01, 10% linear warm-up then linear decay, and
``loss = task + 1.0 * KL(teacher || student)`` on the logits at temperature 1, hidden-state loss
off. Defaults here are that recipe scaled to a CPU: 4 epochs of 64 steps of 32 examples,
patience 2 (about 2 minutes for the built-in model on 2 cores).

Loss: ``task.loss + distill_weight * tau^2 KL(teacher/tau || student/tau)
+ hidden_distill_weight * MSE(first final hidden token) + the method's training_losses()``.
The hidden term compares only the first token of the final hidden states (the text [CLS] of
ViLT, the token its pooler and classifier read): every method protects it and plans keep it
first, while the other tokens of a reduced model have no one-to-one teacher counterpart. A method's
own terms come weighted from ``method.training_losses()`` (DynamicViT: ``{"keep_ratio": ...}``,
weighted by its config); its learned modules (``method.modules()``, built by ``apply()``) train at
``predictor_learning_rate`` and its ``state_dict()`` is saved apart from the backbone.

Several GPUs (accelerate: ``Accelerator``, ``prepare``, ``backward``; no hand-written
distributed code)::

    accelerate launch --num_processes 4 -m pumer_plug.cli finetune --device cuda --method pumer

Each process takes every n-th batch (global batch = ``batch_size`` x processes) and evaluates the
whole val split, so all processes take the same early-stopping decision.

Output directory: ``config.json`` + ``model.safetensors`` (the best epoch, ``save_pretrained``),
``predictors.safetensors`` (the method's ``state_dict()``, when it has learned state), ``method.json`` (method, config, adapter),
``metrics.jsonl`` (one line per epoch), ``finetune.json`` (settings and summary), and
``checkpoint/`` (last state: ``model.safetensors``, ``optimizer.pt``, ``scheduler.pt``,
``rng_<process>.pt`` written with ``torch.save`` of plain tensors and dicts and read back with
``weights_only=True``, and ``trainer_state.json``). ``accelerator.save_state`` is not used: it
pickles RNG states that only load with ``weights_only=False``.

Tasks: a :class:`~pumer_plug.evaluation.tasks.Task` (``load_model`` returns a fresh model each
call: finetuning changes its weights in place) whose ``train_batches(batch_size, seed,
num_examples)`` is called once per epoch with a seed derived from the run seed and the epoch; the
task loss is ``task.loss(logits, targets)``. Steps go through the shared loop
(:func:`~pumer_plug.evaluation.training.loop.train_steps`), with transformers' linear schedule.

Example:
    >>> result = finetune(get_task("builtin"), FinetuneConfig(method="pumer"), "runs/ft-pumer")
    >>> model, method, config = load_finetuned("runs/ft-pumer")
    >>> with attach_finetuned(model, "runs/ft-pumer"): model(**batch)
"""
from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from pumer_plug.errors import UserError
from pumer_plug.evaluation.parallel import Processes
from pumer_plug.evaluation.tasks.base import Task, attach_method, load_config, on_device
from pumer_plug.handle import ReductionHandle

from .finetune_config import DENSE, MIXED_PRECISION, FinetuneConfig, FinetuneResult, config_to_dict
from .finetune_data import Batch, EpochBatches, single_batch, train_batches_of
from .finetune_io import (CHECKPOINT, METHOD_STATE, attach_finetuned, check_same_settings, load_finetuned,
                          read_trainer_state, rng_state, set_rng_state)
from .loop import decay_groups, schedule, train_steps
from .losses import distillation_loss, hidden_distillation_loss

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "load_finetuned", "attach_finetuned", "config_to_dict",
           "train_batches_of", "distillation_loss", "hidden_distillation_loss", "DENSE", "MIXED_PRECISION"]


# -- the model being trained -----------------------------------------------------------------------
class _Student(nn.Module):
    """The plugged backbone and the method's parameters in one module, so that ``prepare`` (DDP)
    moves and synchronises both; the forward is the backbone's."""

    def __init__(self, backbone: nn.Module, predictors: nn.Module | None):
        super().__init__()
        self.backbone = backbone
        self.predictors = predictors if predictors is not None else nn.ModuleDict()

    def forward(self, **inputs: Any) -> Any:
        return self.backbone(**inputs)


def _optimizer(backbone: nn.Module, predictors: nn.Module, config: FinetuneConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on the backbone's matrices only; the method's modules at their own learning rate."""
    groups = decay_groups(backbone, config.weight_decay)
    if len(list(predictors.parameters())):
        groups.append({"params": list(predictors.parameters()), "weight_decay": config.weight_decay,
                       "lr": config.predictor_learning_rate})
    return torch.optim.AdamW(groups, lr=config.learning_rate)


# -- checkpoints -------------------------------------------------------------------------------------
def _fresh_state() -> dict[str, Any]:
    return {"epoch": 0, "batches_done": 0, "step": 0, "best_val_accuracy": None, "best_epoch": -1,
            "bad_epochs": 0, "initial_val_accuracy": None, "history": [], "running": {}, "finished": False,
            "stopped_early": False, "seconds": 0.0}


class _Trainer:
    """One finetuning run; holds the accelerator, the student, the teacher and the loop state."""

    def __init__(self, task: Task, config: FinetuneConfig, output_dir: Path, device: str, progress: bool):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.task, self.config, self.output_dir, self.progress = task, config, output_dir, progress
        self.accelerator = Accelerator(cpu=torch.device(device).type == "cpu", mixed_precision=config.mixed_precision)
        set_seed(config.seed)
        model = task.load_model(torch.device("cpu"))
        self.teacher = None
        if config.distill:
            self.teacher = copy.deepcopy(model).eval().requires_grad_(False).to(self.accelerator.device)
        self.handle: ReductionHandle | None = None
        self.method_config = None
        if config.method_name is not None:
            spec = config.method_config if config.method_config is not None else task.default_config(config.method_name)
            self.method_config = load_config(config.method_name, spec)
            self.handle = attach_method(model, task.adapter, config.method_name, self.method_config)
        self.backbone = model
        acc = self.accelerator  # several processes: each scores every N-th val batch (pumer_plug.evaluation.parallel)
        self.procs = Processes(acc.process_index, acc.num_processes, acc.device)
        try:
            self.val = self.procs.shard(task.batches("val", config.eval_batch_size, config.num_val_examples))
            self._prepare()
        except BaseException:
            self.close()
            raise
        self.state = _fresh_state()

    @property
    def method(self) -> Any:
        return None if self.handle is None else self.handle.method

    def _prepare(self) -> None:
        config = self.config
        predictors = self.method.modules() if self.method is not None else None
        student = _Student(self.backbone, predictors)
        optimizer = _optimizer(self.backbone, student.predictors, config)

        def epoch_batches(seed: int) -> Sequence[Batch]:
            return train_batches_of(self.task, config.batch_size, seed, config.num_train_examples)

        self.data = EpochBatches(epoch_batches, config.seed, config.steps_per_epoch)
        self.data.select_epoch(0)
        loader = torch.utils.data.DataLoader(self.data, batch_size=1, collate_fn=single_batch,
                                             generator=torch.Generator().manual_seed(config.seed))
        self.student, self.optimizer, self.loader = self.accelerator.prepare(student, optimizer, loader)
        self.steps_per_epoch = len(self.loader)
        self.scheduler = schedule(self.optimizer, "linear", config.epochs * self.steps_per_epoch, config.warmup_fraction)

    # -- one step ----------------------------------------------------------------------------------
    def losses(self, inputs: dict[str, torch.Tensor], targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """The weighted loss terms of one batch: task, distill, hidden, and the method's own terms."""
        config, extra = self.config, {}
        if config.hidden_distill_weight > 0:
            extra["output_hidden_states"] = True
        with self.accelerator.autocast():
            outputs = self.student(**inputs, **extra)
            terms = {"task": self.task.loss(outputs.logits, targets)}
            if self.teacher is not None:
                with torch.no_grad():
                    teacher_outputs = self.teacher(**inputs, **extra)
                kl = distillation_loss(outputs.logits, teacher_outputs.logits, config.temperature)
                terms["distill"] = config.distill_weight * kl
                if config.hidden_distill_weight > 0:
                    terms["hidden"] = config.hidden_distill_weight * hidden_distillation_loss(outputs, teacher_outputs)
            if self.method is not None:
                terms.update(self.method.training_losses())
        return terms

    def evaluate(self) -> float:
        """Val accuracy with the method attached (eval mode); several processes score their shares of the
        val batches and every process computes the same value from the gathered predictions."""
        batches = on_device(self.val, self.accelerator.device)
        return float(self.procs.accuracy(self.task, self.accelerator.unwrap_model(self.student).backbone, batches))

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> FinetuneResult:
        state, config = self.state, self.config
        started = time.perf_counter() - state["seconds"]
        if state["step"] == 0 and state["initial_val_accuracy"] is None:
            state["initial_val_accuracy"] = self.evaluate()  # plug-and-play accuracy before training
        while state["epoch"] < config.epochs and not state["stopped_early"]:
            self.train_epoch()
            state["seconds"] = time.perf_counter() - started
            self.end_epoch()
        state.update(finished=True, seconds=time.perf_counter() - started)
        self.save_checkpoint()
        self.write_summary()
        return _result(self.output_dir, state)

    def train_epoch(self) -> None:
        state, config = self.state, self.config
        loader = self.loader
        if state["batches_done"]:
            loader = self.accelerator.skip_first_batches(self.loader, state["batches_done"])
        bar = tqdm(loader, total=self.steps_per_epoch, initial=state["batches_done"], unit="step",
                   desc=f"finetune {config.method} epoch {state['epoch'] + 1}/{config.epochs}",
                   disable=not (self.progress and self.accelerator.is_main_process))
        self.student.train()
        steps = train_steps(bar, lambda batch: self.losses(*batch), self.optimizer, self.scheduler,
                            self.student.parameters(), config.max_grad_norm, self.accelerator)
        for values in steps:
            running = state["running"]
            for key, value in values.items():
                running[key] = running.get(key, 0.0) + value
            running["count"] = running.get("count", 0) + 1
            state["step"] += 1
            state["batches_done"] += 1
            bar.set_postfix(loss=f"{running['loss'] / running['count']:.4f}")
            if config.checkpoint_every and state["step"] % config.checkpoint_every == 0:
                self.save_checkpoint()

    def end_epoch(self) -> None:
        """Evaluates on val, keeps the best weights, counts patience, checkpoints."""
        state, config = self.state, self.config
        val_accuracy = self.evaluate()
        running = dict(state["running"])
        count = max(running.pop("count", 1), 1)
        improved = state["best_val_accuracy"] is None or val_accuracy > state["best_val_accuracy"]
        if improved:
            state.update(best_val_accuracy=val_accuracy, best_epoch=state["epoch"], bad_epochs=0)
        else:
            state["bad_epochs"] += 1
        state["history"].append({
            "epoch": state["epoch"], "step": state["step"], "val_accuracy": val_accuracy, "improved": improved,
            "best_val_accuracy": state["best_val_accuracy"], "learning_rate": self.scheduler.get_last_lr()[0],
            **{f"train_{key}": value / count for key, value in running.items()}, "seconds": state["seconds"],
        })
        state.update(epoch=state["epoch"] + 1, batches_done=0, running={})
        state["stopped_early"] = state["bad_epochs"] >= config.patience and state["epoch"] < config.epochs
        if improved:
            self.save_best()
        self.write_metrics()
        if state["epoch"] < config.epochs and not state["stopped_early"]:
            self.data.select_epoch(state["epoch"])
        self.save_checkpoint()

    # -- files -------------------------------------------------------------------------------------
    def _main_only(self) -> bool:
        self.accelerator.wait_for_everyone()
        return self.accelerator.is_main_process

    def save_checkpoint(self) -> None:
        """Writes ``checkpoint/`` beside the old one, then swaps them (an interrupted save keeps the old)."""
        from safetensors.torch import save_model

        final, staging = self.output_dir / CHECKPOINT, self.output_dir / f"{CHECKPOINT}.tmp"
        if self._main_only():
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        torch.save(rng_state(), staging / f"rng_{self.accelerator.process_index}.pt")
        if self._main_only():
            save_model(self.accelerator.unwrap_model(self.student), str(staging / "model.safetensors"))
            torch.save(self.optimizer.state_dict(), staging / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), staging / "scheduler.pt")
            state = {**self.state, "config": self.config.to_dict()}
            (staging / "trainer_state.json").write_text(json.dumps(state, indent=1))
            old = self.output_dir / f"{CHECKPOINT}.old"
            if final.exists():
                final.rename(old)
            staging.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def load_checkpoint(self) -> None:
        from safetensors.torch import load_model

        folder, device = self.output_dir / CHECKPOINT, self.accelerator.device
        load_model(self.accelerator.unwrap_model(self.student), str(folder / "model.safetensors"), device=str(device))
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location=device, weights_only=True))
        self.scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
        state = json.loads((folder / "trainer_state.json").read_text())
        state.pop("config", None)
        self.state = state
        if state["epoch"] < self.config.epochs:
            self.data.select_epoch(state["epoch"])
        set_rng_state(torch.load(folder / f"rng_{self.accelerator.process_index}.pt", weights_only=True))

    def save_best(self) -> None:
        """The best epoch so far: backbone weights, the method's learned state, method.json, finetune.json."""
        if not self._main_only():
            return
        from safetensors.torch import save_file, save_model
        from transformers import PreTrainedModel

        backbone = self.accelerator.unwrap_model(self.student).backbone
        if isinstance(backbone, PreTrainedModel):
            backbone.save_pretrained(self.output_dir, safe_serialization=True)
            self.task.save_model_assets(self.output_dir)  # e.g. the processor: `--model OUTPUT` loads it
        else:
            save_model(backbone, str(self.output_dir / "model.safetensors"))
        state = self.method.state_dict() if self.method is not None else {}
        if state:
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(self.output_dir / METHOD_STATE))
        method = {"method": self.config.method_name or "dense", "config": config_to_dict(self.method_config),
                  "adapter": self.task.adapter, "state": METHOD_STATE if state else None}
        (self.output_dir / "method.json").write_text(json.dumps(method, indent=2))
        self.write_summary()

    def write_metrics(self) -> None:
        if self._main_only():
            text = "".join(json.dumps(record) + "\n" for record in self.state["history"])
            (self.output_dir / "metrics.jsonl").write_text(text)

    def write_summary(self) -> None:
        if not self.accelerator.is_main_process:
            return
        keys = ("best_val_accuracy", "best_epoch", "initial_val_accuracy", "step", "stopped_early", "finished", "seconds")
        summary = {"task": self.task.name, "adapter": self.task.adapter,
                   "model_class": type(self.backbone).__name__, "model_module": type(self.backbone).__module__,
                   "epochs_run": len(self.state["history"]), **{k: self.state[k] for k in keys},
                   "num_processes": self.accelerator.num_processes, "device": str(self.accelerator.device),
                   "torch_version": torch.__version__, "config": self.config.to_dict()}
        (self.output_dir / "finetune.json").write_text(json.dumps(summary, indent=2))

    def close(self) -> None:
        if self.handle is not None:
            self.handle.remove()



def _result(output_dir: Path, state: dict[str, Any]) -> FinetuneResult:
    return FinetuneResult(output_dir=output_dir, best_val_accuracy=state["best_val_accuracy"],
                          best_epoch=state["best_epoch"], epochs_run=len(state["history"]), steps=state["step"],
                          stopped_early=state["stopped_early"], initial_val_accuracy=state["initial_val_accuracy"],
                          history=state["history"], seconds=state["seconds"])


# -- entry points ------------------------------------------------------------------------------------
def finetune(task: Task, config: FinetuneConfig | None = None, output_dir: str | Path = "results/finetune", *,
             resume: bool = False, device: str = "cpu", progress: bool = True) -> FinetuneResult:
    """Finetunes ``task``'s model with ``config.method`` attached and writes ``output_dir``.

    Args:
        task: a task that can be trained (``Task.train_batches``).
        config: the run's settings (default :class:`FinetuneConfig`).
        output_dir: where the weights, metrics and checkpoint go.
        resume: continue from ``output_dir/checkpoint`` if there is one (a finished run returns at once).
        device: "cpu" or "cuda"; under ``accelerate launch`` each process takes its own GPU.

    Raises:
        UserError: a checkpoint exists and ``resume`` is False, the checkpoint was made with other
            settings, an unknown method or a bad method config, or a task that cannot be trained.
    """
    config = config or FinetuneConfig()
    output_dir = Path(output_dir)
    if config.method_name is not None:
        spec = config.method_config if config.method_config is not None else task.default_config(config.method_name)
        config = dataclasses.replace(config, method_config=load_config(config.method_name, spec))
    previous = read_trainer_state(output_dir)
    if previous is not None:
        if not resume:
            raise UserError(f"{output_dir} already holds a finetuning checkpoint; pass --resume to continue it "
                             "or choose another --output")
        check_same_settings(previous.get("config", {}), config.to_dict(), output_dir)
        if previous["finished"]:
            return _result(output_dir, previous)
    output_dir.mkdir(parents=True, exist_ok=True)
    trainer = _Trainer(task, config, output_dir, device, progress)
    try:
        if previous is not None:
            trainer.load_checkpoint()
        return trainer.run()
    finally:
        trainer.close()
