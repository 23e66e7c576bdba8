"""Task ``custom``: the user's own JSON-lines data (:mod:`.custom`) on the user's model.

The kind of the evaluated split decides the task: VQA lines (``answers``) are scored with the
official VQA accuracy and written in the VQA results format, as ``vqav2``; classification lines
(``label``, one or two images) with accuracy and an ``id,label`` CSV, as ``nlvr2``/``snli-ve``.
Default split ``val`` (``<data-dir>/val.jsonl``); finetuning reads ``train.jsonl``.

Example:
    pumer-plug compare --task custom --data-dir ~/data/my-vqa --model ~/models/vilt-vqa
"""
from __future__ import annotations

from typing import Any


from .base import TaskOptions
from .classification_tasks import LabelTask
from .custom import ClassificationExample, read_custom
from .data_files import ImageSource
from .vl_tasks import DataTask
from .vqav2 import VqaSplit
from .vqav2_task import Vqav2Task


# TASKS entry "custom" (declared in pumer_plug/catalog.py)
class CustomTask(DataTask):
    """Your own VQA or classification data; building one returns a VQA or a classification task."""

    name = "custom"
    adapter = "vilt"
    unit = "examples"
    default_configs: dict[str, Any] = {}
    meter_preset = None

    def __new__(cls, options: TaskOptions | None = None):
        if cls is not CustomTask:
            return super().__new__(cls)
        options = options or TaskOptions()
        if not options.data_dir:  # let DataTask.__init__ say what is missing
            return super().__new__(cls)
        split = read_custom(options.data_dir, options.split or cls.default_split)
        return (CustomVqaTask if split.kind == "vqa" else CustomLabelTask)(options)


class CustomVqaTask(CustomTask, Vqav2Task):
    """Custom VQA lines: official VQA accuracy over the given answers."""

    name = "custom"
    unit = "questions"

    def vqa_split(self, split: str):
        if split not in self._splits:
            custom = read_custom(self.data_dir, split)
            self._splits[split] = VqaSplit(custom.examples, split, True, str(self.data_dir / f"{split}.jsonl"))
        return self._splits[split]


class CustomLabelTask(CustomTask, LabelTask):
    """Custom classification lines: accuracy; two images per line use a two-image head."""

    name = "custom"

    def __init__(self, options: TaskOptions | None = None) -> None:
        super().__init__(options)
        split = read_custom(self.data_dir, self.split)
        self.labels = split.labels
        self.num_images = len(split.examples[0].images)
        self.head = "nlvr2" if self.num_images == 2 else "classification"

    def read_split(self, split: str):
        return read_custom(self.data_dir, split).examples

    def example_inputs(self, example: ClassificationExample) -> tuple[tuple[ImageSource, ...], str, str]:
        return tuple(example.images), example.text, f"image of {example.example_id}"

    def example_id(self, example: ClassificationExample) -> str:
        return example.example_id

    def gold(self, example: ClassificationExample) -> str | None:
        return example.label
