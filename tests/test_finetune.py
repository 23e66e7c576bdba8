"""Finetuning with a method attached: loss, distillation, resume, early stopping, DynamicViT predictors.

A tiny ViLT (C = 32, 2 layers, 16 image patches) on a fake task whose answer is readable from the
second text token, so a few steps of training visibly lower the loss.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import ViltConfig, ViltForQuestionAnswering

from pumer_plug import PumerConfig
from pumer_plug.baselines.dynamicvit import DynamicViTConfig
from pumer_plug.evaluation.tasks import Task, classification_accuracy
from pumer_plug.evaluation.training.finetune import (FinetuneConfig, _Trainer, attach_finetuned, finetune,
                                                     load_finetuned, train_batches_of)

NUM_LABELS = 5


def tiny_model() -> ViltForQuestionAnswering:
    torch.manual_seed(0)
    config = ViltConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        image_size=64, patch_size=16, max_position_embeddings=16, num_labels=NUM_LABELS,
                        vocab_size=50, num_channels=1)
    return ViltForQuestionAnswering(config).eval()


def make_examples(n: int, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 50, (n, 8), generator=g)
    ids[:, 0] = 2
    ids[:, 1:] = 5 + ids[:, 1:2] % NUM_LABELS  # every question token names the answer
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "pixel_values": torch.randn(n, 1, 64, 64, generator=g)}
    return inputs, ids[:, 1] - 5


def take(data, index) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    inputs, targets = data
    return {k: v[index] for k, v in inputs.items()}, targets[index]


class TinyTask(Task):
    """A trainable Task; ``fail_at`` raises at that train-batch access."""

    name = "tiny"
    adapter = "vilt"

    def __init__(self, num_train: int = 24, fail_at: int | None = None, val_accuracies: list[float] | None = None):
        super().__init__()
        self.train = make_examples(num_train, 0)
        self.val = make_examples(16, 1)
        self.fail_at, self.accesses = fail_at, 0
        self.val_accuracies = val_accuracies

    def load_model(self, device):
        return tiny_model().to(device)

    def train_batches(self, batch_size, seed, num_examples):
        order = torch.randperm(len(self.train[1]), generator=torch.Generator().manual_seed(seed % 2**31))
        return _Batches(self, [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)])

    def batches(self, split, batch_size, num_examples=None):
        return [take(self.val, slice(i, i + batch_size)) for i in range(0, num_examples or 16, batch_size)]

    def accuracy(self, model, batches):
        if self.val_accuracies is not None:
            return self.val_accuracies.pop(0)
        return classification_accuracy(model, batches)

    def default_config(self, method):
        if method != "pumer":
            return super().default_config(method)
        return PumerConfig(reduction_layers=(0, 1), prune_ratio=0.2, image_merge_ratio=0.3, text_merge_ratio=0.2)


class _Batches(list):
    def __init__(self, task, indices):
        super().__init__(indices)
        self.task = task

    def __getitem__(self, i):
        self.task.accesses += 1
        if self.task.fail_at is not None and self.task.accesses == self.task.fail_at:
            raise RuntimeError("simulated preemption")
        return take(self.task.train, super().__getitem__(i))


def small(**overrides) -> FinetuneConfig:
    values = dict(method="pumer", epochs=2, batch_size=8, eval_batch_size=8, num_val_examples=16,
                  learning_rate=3e-3, patience=5, seed=0)
    return FinetuneConfig(**{**values, **overrides})


def test_training_lowers_the_task_loss(tmp_path):
    result = finetune(TinyTask(num_train=64), small(epochs=4, distill=False, learning_rate=1e-2), tmp_path, progress=False)
    losses = [epoch["train_task"] for epoch in result.history]
    assert losses[-1] < 0.85 * losses[0], losses
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 2, 3]
    model, method, config = load_finetuned(tmp_path)
    assert method == "pumer" and config == TinyTask().default_config("pumer")
    with attach_finetuned(model, tmp_path) as handle:
        model(**take(TinyTask().val, slice(0, 4))[0])
        assert handle.token_counts[1].image < 17  # the method really reduces the loaded model


def test_distillation_from_an_identical_teacher_is_zero(tmp_path):
    trainer = _Trainer(TinyTask(), small(method="none", hidden_distill_weight=1.0), tmp_path, "cpu", False)
    terms = trainer.losses(*take(TinyTask().train, slice(0, 8)))
    assert terms["distill"].abs() < 1e-6 and terms["hidden"].abs() < 1e-8
    assert terms["task"] > 0.1


def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(tmp_path):
    config = small(method="dynamicvit", method_config=DynamicViTConfig(reduction_layers=(0,), keep_ratio=0.5),
                   epochs=2, checkpoint_every=1)
    finetune(TinyTask(), config, tmp_path / "straight", progress=False)
    with pytest.raises(RuntimeError, match="preemption"):
        finetune(TinyTask(fail_at=5), config, tmp_path / "resumed", progress=False)
    state = json.loads((tmp_path / "resumed" / "checkpoint" / "trainer_state.json").read_text())
    assert 0 < state["step"] < 6 and not state["finished"]
    with pytest.raises(ValueError, match="--resume"):
        finetune(TinyTask(), config, tmp_path / "resumed", progress=False)
    finetune(TinyTask(), config, tmp_path / "resumed", resume=True, progress=False)
    for name in ("checkpoint/model.safetensors", "predictors.safetensors", "model.safetensors"):
        a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "resumed" / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{name}: {key}")
    metrics = [(tmp_path / d / "metrics.jsonl").read_text() for d in ("straight", "resumed")]
    strip = [[{k: v for k, v in json.loads(l).items() if k != "seconds"} for l in m.splitlines()] for m in metrics]
    assert strip[0] == strip[1]


def test_early_stopping_stops_after_patience_epochs_without_improvement(tmp_path):
    task = TinyTask(val_accuracies=[0.1, 0.5, 0.4, 0.5, 0.3, 0.9, 0.9])
    result = finetune(task, small(epochs=6, patience=2, distill=False), tmp_path, progress=False)
    assert result.stopped_early and result.epochs_run == 3 and result.best_epoch == 0
    assert result.initial_val_accuracy == 0.1 and result.best_val_accuracy == 0.5


def test_dynamicvit_predictors_get_gradients_and_are_saved_apart(tmp_path):
    config = small(method="dynamicvit", method_config=DynamicViTConfig(reduction_layers=(0, 1), keep_ratio=0.5), epochs=1)
    trainer = _Trainer(TinyTask(), config, tmp_path / "probe", "cpu", False)
    try:  # a failure here must not leave the model plugged for later tests
        trainer.student.train()
        terms = trainer.losses(*take(TinyTask().train, slice(0, 8)))
        assert {"task", "distill", "keep_ratio"} <= set(terms)
        sum(terms.values()).backward()
        grads = [p.grad for p in trainer.method.modules().parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    finally:
        trainer.close()

    finetune(TinyTask(), config, tmp_path / "run", progress=False)
    predictors = load_file(tmp_path / "run" / "predictors.safetensors")
    backbone = load_file(tmp_path / "run" / "model.safetensors")
    assert predictors and not any("predictor" in k or "in_conv" in k for k in backbone)
    model, method, _ = load_finetuned(tmp_path / "run")
    with attach_finetuned(model, tmp_path / "run") as handle:
        loaded = handle.method.modules().state_dict()
    assert method == "dynamicvit" and all(torch.equal(loaded[k], predictors[k]) for k in predictors)


def test_bad_settings_name_the_field_and_untrainable_tasks_are_refused():
    with pytest.raises(ValueError, match="FinetuneConfig.patience"):
        FinetuneConfig(patience=0)
    with pytest.raises(ValueError, match="mixed_precision"):
        FinetuneConfig(mixed_precision="fp8")

    class EvalOnly(Task):
        name = "eval-only"

    with pytest.raises(ValueError, match="train_batches"):
        train_batches_of(EvalOnly(), 8, 0)
