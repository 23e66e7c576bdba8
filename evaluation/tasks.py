"""Tasks the harness evaluates on: a model, batches of (inputs, answer ids), and accuracy.

The built-in task is visual question answering over scikit-learn's handwritten digits with a
small ViLT trained here (:mod:`pumer_plug.evaluation.builtin`). Other tasks register with
:func:`register_task` and implement the same methods.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from pumer_plug.config import load_method_config

TASKS: dict[str, Callable[..., Any]] = {}

Batch = tuple[dict[str, torch.Tensor], torch.Tensor]


def register_task(name: str):
    def decorator(factory: Callable[..., Any]) -> Callable[..., Any]:
        TASKS[name] = factory
        return factory

    return decorator


def get_task(name: str, **kwargs: Any) -> Any:
    """Builds a registered task.

    Raises:
        ValueError: unknown task name, listing the known ones.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name](**kwargs)


def classification_accuracy(model: nn.Module, batches: Sequence[Batch]) -> float:
    """Fraction of examples whose argmax logit equals the answer id (eval mode, inference mode)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    with torch.inference_mode():
        for inputs, answers in batches:
            predicted = model(**inputs).logits.argmax(dim=-1)
            correct += int((predicted == answers).sum())
            total += answers.numel()
    model.train(was_training)
    return correct / max(total, 1)


@register_task("builtin")
class BuiltinDigitsTask:
    """VQA over real handwritten digits with the built-in ViLT (trained on first use, then cached).

    Args:
        cache_dir: root of the pumer-plug cache (default ``$PUMER_PLUG_CACHE`` or ``~/.cache/pumer-plug``).
        retrain: retrain even if a valid cached model exists.
        num_test_examples: size of the test split.
    """

    name = "builtin-digits-vqa"
    adapter = "vilt"
    #: per-method configs scaled to the built-in model's 6 layers (see docs/benchmarks.md)
    DEFAULT_CONFIGS: dict[str, Any] = {
        "pumer": "builtin-digits",
        "tome": {"r": 12},
        "dynamicvit": {"reduction_layers": [1, 3, 4], "keep_ratio": 0.7},
        "smres": {"scale": 0.75},
    }

    def __init__(self, cache_dir: str | None = None, retrain: bool = False, num_test_examples: int | None = None):
        from pumer_plug.evaluation import builtin

        self.cache_dir = builtin.builtin_model_dir(cache_dir)
        self._cache_root = cache_dir
        self._retrain = retrain
        self.num_test_examples = num_test_examples or builtin.NUM_TEST_EXAMPLES
        self._tokenizer = None

    def load_model(self, device: torch.device) -> nn.Module:
        from pumer_plug.evaluation import builtin

        model, self._tokenizer = builtin.load_builtin_model(self._cache_root, retrain=self._retrain)
        self._retrain = False
        return model.to(device).eval()

    def dataset(self, split: str, num_examples: int | None = None):
        from pumer_plug.evaluation import builtin
        from pumer_plug.evaluation.digits import DigitsVQA

        if self._tokenizer is None:
            _, self._tokenizer = builtin.load_builtin_model(self._cache_root)
        sizes = {"test": self.num_test_examples, "val": builtin.NUM_VAL_EXAMPLES}
        return DigitsVQA(split, num_examples or sizes.get(split, 1000), seed=0, tokenizer=self._tokenizer)

    def batches(self, split: str, batch_size: int) -> list[Batch]:
        return list(self.dataset(split).batches(batch_size))

    def reference_accuracies(self, split: str = "test") -> dict[str, float]:
        """Accuracies of trivial predictors on ``split``: always the most frequent train answer, and
        the most frequent train answer per question (the best a model that ignores the image does)."""
        from pumer_plug.evaluation.digits import DigitsVQA, majority_answer_accuracy, question_prior_accuracy

        data, train = self.dataset(split), DigitsVQA("train", 10000, seed=0, tokenizer=self._tokenizer)
        return {"majority answer": majority_answer_accuracy(data, train),
                "question-only prior": question_prior_accuracy(data, train)}

    def accuracy(self, model: nn.Module, batches: Sequence[Batch]) -> float:
        return classification_accuracy(model, batches)

    def default_config(self, method: str) -> Any:
        return load_method_config(method, self.DEFAULT_CONFIGS.get(method))
