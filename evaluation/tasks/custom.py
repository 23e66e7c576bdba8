"""The user's own data: one JSON-lines file per split, images by path relative to the data folder.

Layout (see ``docs/data-formats.md``)::

    <data-dir>/<split>.jsonl
    <data-dir>/<any sub-folders>/<images>

Each line is one example. Visual question answering (scored with the official VQA accuracy over
however many answers are given)::

    {"id": "q1", "image": "images/kitchen.jpg", "text": "What color is the kettle?", "answers": ["red", "red", "dark red"]}

Classification over one or more images (accuracy; the label must be one of the model's labels)::

    {"id": "p1", "images": ["pairs/a.jpg", "pairs/b.jpg"], "text": "Both images show dogs.", "label": "True"}

All lines of a file are of one kind. ``answer_type`` (VQA) is optional. A VQA line needs at least
2 answers (the leave-one-out score of a single answer is always 0); a sole correct answer repeated
4 times scores 1 when predicted.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .data_files import DataError, ImageSource, LazyRecords, iter_jsonl, require_fields, safe_join
from .vqav2 import VqaExample

CUSTOM_LAYOUT = (
    '<data-dir>/{split}.jsonl, one JSON object per line: {"id", "image" or "images" (paths relative to '
    '<data-dir>), "text", and "answers" (a list, VQA) or "label" (a string, classification)}'
)


@dataclass(frozen=True)
class ClassificationExample:
    """One text with one or more images and a class label.

    Attributes:
        example_id: the line's ``id``.
        text: the sentence or question.
        images: the image files, in the order given.
        label: the gold label string.
    """

    example_id: str
    text: str
    images: tuple[ImageSource, ...]
    label: str


@dataclass(frozen=True)
class CustomSplit:
    """A split of the user's own data.

    Attributes:
        kind: ``vqa`` (records are :class:`~.vqav2.VqaExample`) or ``classification``.
        examples: the records.
        labels: the distinct gold labels, sorted (classification; empty for VQA).
    """

    kind: Literal["vqa", "classification"]
    examples: Sequence[VqaExample] | Sequence[ClassificationExample]
    labels: tuple[str, ...]


def _image_paths(data_dir: Path, record: dict[str, Any], where: str) -> tuple[Path, ...]:
    images = record.get("images", [record["image"]] if "image" in record else None)
    if not isinstance(images, list) or not images or not all(isinstance(p, str) for p in images):
        raise DataError(f"{where} needs \"image\": path or \"images\": [paths] (relative to {data_dir})")
    return tuple(safe_join(data_dir, p) for p in images)


def _kind(record: dict[str, Any], where: str) -> str:
    if "answers" in record and "label" not in record:
        if not isinstance(record["answers"], list) or len(record["answers"]) < 2:
            raise DataError(f"{where}: \"answers\" must list at least 2 answers (VQA accuracy leaves one out; "
                            "a single answer always scores 0): repeat a sole correct answer 4 times for full credit")
        return "vqa"
    if "label" in record and "answers" not in record:
        return "classification"
    raise DataError(f"{where} needs exactly one of \"answers\" (VQA) or \"label\" (classification)")


def read_custom(data_dir: Path | str, split: str) -> CustomSplit:
    """Reads ``<data-dir>/<split>.jsonl`` in the format of the module docstring.

    Raises:
        DataError: the file is missing (naming the layout); a line lacks a field, repeats an id,
            mixes kinds with earlier lines, gives a VQA question several images or fewer than 2 answers, or has an image path
            that leaves the data folder (naming the id).
    """
    data_dir = Path(data_dir)
    path = data_dir / f"{split}.jsonl"
    records: list[VqaExample | ClassificationExample] = []
    kind: str | None = None
    seen: set[str] = set()
    for number, record in enumerate(iter_jsonl(path, CUSTOM_LAYOUT), start=1):
        require_fields(record, ("id", "text"), f"{path} line {number}")
        example_id = str(record["id"])
        where = f"{path} example {example_id}"
        if example_id in seen:
            raise DataError(f"{path}: id {example_id} appears twice")
        seen.add(example_id)
        this_kind = _kind(record, where)
        if kind is not None and this_kind != kind:
            raise DataError(f"{where} is a {this_kind} example but earlier lines are {kind}; use one kind per file")
        kind = this_kind
        images = _image_paths(data_dir, record, where)
        if kind == "vqa":
            if len(images) != 1:
                raise DataError(f"{where}: a VQA question takes one image, got {len(images)}")
            qid = record["id"]
            records.append(VqaExample(qid, record["text"], images[0], str(images[0].relative_to(data_dir)),
                                      tuple(str(a) for a in record["answers"]), record.get("answer_type")))
        else:
            records.append(ClassificationExample(example_id, record["text"], images, str(record["label"])))
    if kind is None:
        raise DataError(f"{path} has no examples")
    labels = tuple(sorted({r.label for r in records})) if kind == "classification" else ()  # type: ignore[union-attr]
    return CustomSplit(kind, LazyRecords(len(records), records.__getitem__), labels)  # type: ignore[arg-type]
