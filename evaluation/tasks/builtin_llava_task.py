"""The built-in decoder-VLM task: digits VQA answered in words by a small LLaVA trained here.

The model and its cache are in :mod:`~pumer_plug.evaluation.tasks.builtin_llava`; the data is the
ViLT task's (:mod:`~pumer_plug.evaluation.tasks.digits`), as prompts of 144 image tokens and
<= 15 text tokens. An answer is right when the greedily generated word equals the reference.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn

from pumer_plug.errors import UserError

from . import builtin_llava
from .base import Batch, Predictions, Reiterable, Task, TaskOptions
from .builtin_llava_data import IMAGE, collate_llava
from .digits import SPLITS, DigitsVQA, majority_answer_accuracy, question_prior_accuracy

#: image tokens kept of 144 by every method in ``compare`` (pool's 2 x 2 grid gives the same 36),
#: from decoder layer 1 on: about half the dense prefill FLOPs (docs/benchmarks.md)
KEEP_TOKENS = 36


# TASKS entry "builtin-llava" (declared in pumer_plug/catalog.py)
class BuiltinLlavaTask(Task):
    """VQA over real handwritten digits with the built-in LLaVA (trained on first use, then cached).

    Options used: ``cache_dir``, ``retrain``, ``num_test_examples`` (default 1000).
    """

    name = "builtin-llava-digits-vqa"
    adapter = "llava"
    generates = True
    speedup_label = "prefill speed-up"
    accepted_options = frozenset({"cache_dir", "retrain", "num_test_examples"})
    default_configs = {
        "pumer": {"reduction_layers": [0], "prune_ratio": (144 - 1.5 * KEEP_TOKENS) / 144,
                  "image_merge_ratio": 0.5 * KEEP_TOKENS / 144, "text_merge_ratio": 0.0},
        "fastv": {"layer": 1, "keep_tokens": KEEP_TOKENS},
        "random": {"layer": 1, "keep_tokens": KEEP_TOKENS, "seed": 0},
        "pool": {"stride": 2},
    }

    def __init__(self, options: TaskOptions | None = None):
        super().__init__(options)
        self.options = dataclasses.replace(
            self.options, num_test_examples=self.options.num_test_examples or builtin_llava.NUM_TEST_EXAMPLES)
        self._retrain = self.options.retrain
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            _, self._tokenizer = builtin_llava.load_builtin_llava(self.options.cache_dir)
        return self._tokenizer

    def load_model(self, device: torch.device) -> nn.Module:
        model, self._tokenizer = builtin_llava.load_builtin_llava(self.options.cache_dir, retrain=self._retrain)
        self._retrain = False
        return model.to(device).eval()

    def dataset(self, split: str, num_examples: int | None = None) -> DigitsVQA:
        """The examples of ``split`` (seed 0), ``num_examples`` of them or the split's size.

        Raises:
            UserError: an unknown split.
        """
        if split not in SPLITS:
            raise UserError(f"task {self.name!r} has no split {split!r}; splits: {', '.join(SPLITS)}")
        return DigitsVQA(split, num_examples or self.split_sizes[split], seed=0)

    @property
    def split_sizes(self) -> dict[str, int]:
        return {"train": 2048, "val": builtin_llava.NUM_VAL_EXAMPLES, "test": self.options.num_test_examples}

    def batches(self, split: str, batch_size: int, num_examples: int | None = None) -> Iterable[Batch]:
        """Left-padded prompts and the answer-word token ids (B,) as targets; at most ``num_examples``
        of the split's examples (never more than the split holds)."""
        if split not in SPLITS:
            raise UserError(f"task {self.name!r} has no split {split!r}; splits: {', '.join(SPLITS)}")
        size = self.split_sizes[split]
        data, tokenizer = self.dataset(split, min(num_examples or size, size)), self.tokenizer

        def make():
            for start in range(0, len(data), batch_size):
                indices = list(range(start, min(start + batch_size, len(data))))
                inputs, answers = collate_llava([data.examples[i] for i in indices], tokenizer, data.noise_std,
                                                [data._noise_base + i for i in indices])
                yield inputs, torch.tensor([tokenizer.token_to_id(a) for a in answers])

        return Reiterable(make)

    def predictions(self, model: nn.Module, batches: Iterable[Batch]) -> Predictions:
        """Greedy generated answers (normalised words) and the reference words."""
        result = Predictions()
        for inputs, targets in batches:
            result.outputs += builtin_llava.generate_answers(model, self.tokenizer, inputs)
            result.targets += [self.tokenizer.id_to_token(int(t)) for t in targets]
        return result

    def image_tokens(self, inputs: dict[str, torch.Tensor]) -> int:
        """The ``<image>`` tokens of the first prompt (144 on the task's canvas)."""
        return int((inputs["input_ids"][0] == self.tokenizer.token_to_id(IMAGE)).sum())

    def token_texts(self, input_ids: Sequence[int]) -> list[str]:
        """The word of every token id (``pumer-plug show``); specials as written, e.g. ``<image>``."""
        return [self.tokenizer.id_to_token(int(i)) or str(i) for i in input_ids]

    def reference_accuracies(self, split: str = "test") -> dict[str, float]:
        """Always the most frequent train answer, and the best answer per question (question-only prior)."""
        data, train = self.dataset(split), DigitsVQA("train", 10000, seed=0)
        return {"majority answer": majority_answer_accuracy(data, train),
                "question-only prior": question_prior_accuracy(data, train)}

    def train_batches(self, batch_size: int, seed: int, num_examples: int) -> Sequence[Batch]:
        raise UserError(f"task {self.name!r} is trained by `pumer-plug train --model llava`; finetuning a "
                        "generative task is not supported yet")
