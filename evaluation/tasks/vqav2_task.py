"""Task ``vqav2``: the user's VQA model (``ViltForQuestionAnswering``, ...) on VQAv2 from disk.

Data: the official JSON layout (:mod:`.vqav2`) or ViLT's ``vqav2_<split>.arrow`` (:mod:`.arrow_tables`),
auto-detected in ``--data-dir``. Answers are the model's labels (``config.id2label``). Metric: the
official VQA accuracy (:func:`.vqa_metric.vqa_accuracy`) overall (the headline ``vqa_accuracy``) and
per answer type; on arrow tables, which keep only soft scores, ViLT's soft-score accuracy. Splits
without answers (test-dev, test) write the submission file only. Training: ViLT's soft-score
targets and binary cross-entropy (``ViLT objectives.compute_vqa``).

Example:
    pumer-plug compare --task vqav2 --data-dir ~/data/vqav2 --model ~/models/vilt-vqa --limit 2000
"""
from __future__ import annotations

import collections

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


from .answer_space import AnswerSpace, map_labels, vqa_soft_targets
from .arrow_tables import read_vqav2_arrow
from .base import Predictions
from .data_files import ImageSource
from .predictions import RunOutputs, write_vqa_results
from .vl_tasks import DataTask, Part
from .vqa_metric import soft_score_accuracy, vqa_accuracy
from .vqav2 import VqaExample, read_vqav2


def read_vqa_split(data_dir: Path, split: str):
    """The VqaSplit of ``split``: ViLT's arrow table if ``vqav2_<split>.arrow`` is there, else the official JSON."""
    if (data_dir / f"vqav2_{split}.arrow").is_file():
        return read_vqav2_arrow(data_dir, split)
    return read_vqav2(data_dir, split)


# TASKS entry "vqav2" (declared in pumer_plug/catalog.py)
class Vqav2Task(DataTask):
    """VQAv2 on the user's model; options: ``model``, ``data_dir``, ``split`` (default val), ``limit``, ..."""

    name = "vqav2"
    adapter = "vilt"
    head = "vqa"
    metric = "vqa_accuracy"
    unit = "questions"
    default_split = "val"
    default_configs = {"pumer": "vilt-vqa"}

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self._splits: dict[str, Any] = {}

    def vqa_split(self, split: str):
        if split not in self._splits:
            self._splits[split] = read_vqa_split(self.data_dir, split)
        return self._splits[split]

    def read_split(self, split: str):
        return self.vqa_split(split).examples

    def example_inputs(self, example: VqaExample) -> tuple[tuple[ImageSource, ...], str, str]:
        return (example.image,), example.question, f"image of question {example.question_id}"

    @property
    def space(self) -> AnswerSpace:
        return AnswerSpace.from_id2label(self.user_model.model.config.id2label)

    def reference_text(self, example: VqaExample) -> str:
        """The most common annotator answer (or the best-scored one of an arrow table); "?" without answers."""
        if example.answers:
            return collections.Counter(example.answers).most_common(1)[0][0]
        return max(example.answer_scores, key=lambda pair: pair[1])[0] if example.answer_scores else "?"

    def train_target(self, example: VqaExample) -> torch.Tensor | None:
        """ViLT's soft scores over the model's labels (B, K); None when no answer is a label."""
        if example.answer_scores:  # arrow tables: the scores ViLT stored
            pairs = [(self.space.label_id(a), s) for a, s in example.answer_scores]
            pairs = [(i, s) for i, s in pairs if i is not None]
            target = torch.zeros(len(self.space))
            for i, s in pairs:
                target[i] = s
            return target if pairs else None
        soft = vqa_soft_targets(example.answers, self.space)
        return soft.dense(len(self.space)) if soft.label_ids else None

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """ViLT's VQA loss: BCE with logits on the soft scores, times the number of labels.

        Shapes:
            logits (B, K), targets (B, K) -> scalar
        """
        return F.binary_cross_entropy_with_logits(logits.float(), targets.float()) * targets.shape[1]

    def metrics(self, predictions: Predictions) -> dict[str, float | None]:
        part, examples, outputs = self.evaluated(predictions)
        by_qid = {examples[i].question_id: outputs[i] for i in outputs}
        questions = [examples[i] for i in sorted(outputs)]
        if not self.vqa_split(part.split).has_answers and not any(q.answer_scores for q in questions):
            self.notes["metric"] = "none: the split has no answers (submission file only)"
            return {self.metric: None}
        if questions[0].answers:
            score = vqa_accuracy(by_qid, questions)
            coverage = map_labels(sorted({a for q in questions for a in q.answers}), self.space)[1]  # distinct answers
            self.notes.update(metric="official VQA accuracy", label_coverage=coverage.describe())
        else:
            score = soft_score_accuracy(by_qid, questions)
            self.notes.update(metric="ViLT soft-score accuracy (arrow table: answers outside ViLT's labels were dropped "
                                     "when the table was written)")
        self.notes["vqa_accuracy_per_answer_type"] = score.per_answer_type
        return {self.metric: score.overall, **{f"vqa_accuracy/{k}": v for k, v in score.per_answer_type.items()}}

    def write_official(self, outputs: RunOutputs, method: str, part: Part, predictions: Predictions) -> Path:
        answers = {part.examples[gid - part.offset].question_id: answer
                   for gid, answer in zip(predictions.targets, predictions.outputs)}
        return write_vqa_results(outputs, method, part.split, answers)
