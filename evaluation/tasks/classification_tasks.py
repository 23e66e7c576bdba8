"""Tasks ``nlvr2`` and ``snli-ve``: label classification with the user's model on the public data.

- ``nlvr2``: a sentence about two images, True/False (``ViltForImagesAndTextClassification``), from the
  official JSON lines (:mod:`.nlvr2`) or ViLT's ``nlvr2_<split>.arrow``; default split ``dev``.
- ``snli-ve``: does a Flickr30k image entail a hypothesis (entailment/neutral/contradiction), from
  ``snli_ve_<split>.jsonl`` (:mod:`.snli_ve`) or METER's ``snli_<split>.arrow``; default split ``test``.
  The model is a 3-label classifier (e.g. ``ViltForQuestionAnswering`` with those three labels).

Labels come from the model's ``config.id2label``; a model without the task's label names is refused
in one line. Predictions: ``identifier,label`` CSV as NLVR2's ``metrics.py`` reads (:mod:`.predictions`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch.nn as nn

from pumer_plug.errors import UserError

from .arrow_tables import read_nlvr2_arrow, read_snli_ve_arrow
from .base import Predictions
from .classification_metric import label_accuracy
from .data_files import ImageSource
from .nlvr2 import NLVR2_LABELS, Nlvr2Example, read_nlvr2
from .predictions import RunOutputs, write_label_predictions
from .snli_ve import SNLI_VE_LABELS, SnliVeExample, read_snli_ve
from .vl_tasks import DataTask, Part


class LabelTask(DataTask):
    """A :class:`DataTask` scored by label accuracy; subclasses give ``labels``, ids, labels and inputs."""

    #: the label names the model must have
    labels: ClassVar[tuple[str, ...]] = ()

    def example_id(self, example: Any) -> str:
        raise NotImplementedError

    def gold(self, example: Any) -> str | None:
        raise NotImplementedError

    def check_model(self, model: nn.Module) -> None:
        names = set(model.config.id2label.values())
        missing = [label for label in self.labels if label not in names]
        if missing:
            raise UserError(f"--model {self.options.model}: its labels {sorted(names)[:6]} lack {missing}; "
                            f"task {self.name!r} needs a head with the labels {list(self.labels)} (config.id2label)")

    def reference_text(self, example: Any) -> str:
        gold = self.gold(example)
        return "?" if gold is None else str(gold)

    def train_target(self, example: Any) -> int | None:
        gold = self.gold(example)
        return None if gold is None else int(self.user_model.model.config.label2id[gold])

    def metrics(self, predictions: Predictions) -> dict[str, float | None]:
        part, examples, outputs = self.evaluated(predictions)
        gold = {self.example_id(examples[i]): self.gold(examples[i]) for i in outputs}
        if any(label is None for label in gold.values()):
            self.notes["metric"] = "none: the split has no labels (predictions file only)"
            return {self.metric: None}
        score = label_accuracy({self.example_id(examples[i]): outputs[i] for i in outputs}, gold)
        self.notes["accuracy_per_class"] = score.per_class
        return {self.metric: score.accuracy, **{f"accuracy/{k}": v for k, v in score.per_class.items()}}

    def write_official(self, outputs: RunOutputs, method: str, part: Part, predictions: Predictions) -> Path:
        rows = {self.example_id(part.examples[gid - part.offset]): label
                for gid, label in zip(predictions.targets, predictions.outputs)}
        return write_label_predictions(outputs, method, self.name, part.split, rows)


# TASKS entry "nlvr2" (declared in pumer_plug/catalog.py)
class Nlvr2Task(LabelTask):
    """NLVR2 on the user's two-image model; options as ``vqav2`` (default split ``dev``)."""

    name = "nlvr2"
    adapter = "vilt"
    head = "nlvr2"
    num_images = 2
    unit = "sentences"
    default_split = "dev"
    val_split = "dev"
    labels = NLVR2_LABELS
    default_configs = {"pumer": "vilt-nlvr2"}
    meter_preset = "meter-nlvr2"

    def read_split(self, split: str):
        if (self.data_dir / f"nlvr2_{split}.arrow").is_file():
            return read_nlvr2_arrow(self.data_dir, split)
        return read_nlvr2(self.data_dir, split)

    def example_inputs(self, example: Nlvr2Example) -> tuple[tuple[ImageSource, ...], str, str]:
        return tuple(example.images), example.sentence, f"image pair of {example.identifier}"

    def example_id(self, example: Nlvr2Example) -> str:
        return example.identifier

    def gold(self, example: Nlvr2Example) -> str | None:
        return example.label


# TASKS entry "snli-ve" (declared in pumer_plug/catalog.py)
class SnliVeTask(LabelTask):
    """SNLI-VE on the user's 3-way classifier; options as ``vqav2`` (default split ``test``)."""

    name = "snli-ve"
    adapter = "vilt"
    head = "classification"
    unit = "hypotheses"
    default_split = "test"
    val_split = "dev"
    labels = SNLI_VE_LABELS
    default_configs = {"pumer": "vilt-ve"}
    meter_preset = "meter-ve"

    def read_split(self, split: str):
        for name in (f"snli_{split}.arrow", f"snli_ve_{split}.arrow"):
            if (self.data_dir / name).is_file():
                return read_snli_ve_arrow(self.data_dir, split)
        return read_snli_ve(self.data_dir, split)

    def example_inputs(self, example: SnliVeExample) -> tuple[tuple[ImageSource, ...], str, str]:
        return (example.image,), example.hypothesis, f"image of {example.pair_id}"

    def example_id(self, example: SnliVeExample) -> str:
        return example.pair_id

    def gold(self, example: SnliVeExample) -> str | None:
        return example.label
