"""VQAv2 as released (visualqa.org): question and annotation JSON plus COCO image folders.

Layout (the files straight from the download page, unzipped into one folder; the official
``Questions/``, ``Annotations/`` and ``Images/mscoco/`` sub-folders are also found)::

    <data-dir>/v2_OpenEnded_mscoco_val2014_questions.json
    <data-dir>/v2_mscoco_val2014_annotations.json
    <data-dir>/val2014/COCO_val2014_000000000042.jpg
    <data-dir>/v2_OpenEnded_mscoco_test-dev2015_questions.json   (no annotations: submission only)
    <data-dir>/test2015/COCO_test2015_000000000001.jpg
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from .data_files import DataError, ImageSource, LazyRecords, load_json

#: split -> (questions file, annotations file or None, image folder and file prefix)
VQAV2_FILES: dict[str, tuple[str, str | None, str]] = {
    "train": ("v2_OpenEnded_mscoco_train2014_questions.json", "v2_mscoco_train2014_annotations.json", "train2014"),
    "val": ("v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json", "val2014"),
    "test-dev": ("v2_OpenEnded_mscoco_test-dev2015_questions.json", None, "test2015"),
    "test": ("v2_OpenEnded_mscoco_test2015_questions.json", None, "test2015"),
}
VQAV2_LAYOUT = (
    "<data-dir>/v2_OpenEnded_mscoco_{split}2014_questions.json, <data-dir>/v2_mscoco_{split}2014_annotations.json, "
    "images <data-dir>/{split}2014/COCO_{split}2014_{image_id:012d}.jpg (test-dev: questions "
    "v2_OpenEnded_mscoco_test-dev2015_questions.json, images test2015/)"
)


@dataclass(frozen=True)
class VqaExample:
    """One visual question.

    Attributes:
        question_id: the dataset's id (an int for VQAv2; custom sets may use strings).
        question: the question text.
        image: the image file (or encoded bytes, arrow tables).
        image_id: the COCO image id (or the custom set's image name).
        answers: the 10 annotators' raw answers; empty where the split has no annotations or
            the source keeps only soft scores (ViLT arrow tables).
        answer_type: ``yes/no``, ``number`` or ``other`` (None if unknown).
        question_type: the question's type from the annotations (``what color``, ...).
        answer_scores: (answer, soft score) pairs as ViLT's arrow tables store them; empty otherwise.
    """

    question_id: int | str
    question: str
    image: ImageSource
    image_id: int | str
    answers: tuple[str, ...] = ()
    answer_type: str | None = None
    question_type: str | None = None
    answer_scores: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class VqaSplit:
    """A split of a VQA dataset.

    Attributes:
        examples: the questions, built on access (images are not decoded).
        name: the split name.
        has_answers: whether answers exist (False for test-dev/test: write a submission file only).
        source: the files read, for the output.
    """

    examples: Sequence[VqaExample]
    name: str
    has_answers: bool
    source: str


def _find(data_dir: Path, name: str, subdirs: Sequence[str]) -> Path:
    """``name`` in the first of ``data_dir/<subdir>`` that has it; the plain path if none does."""
    for sub in subdirs:
        candidate = data_dir / sub / name
        if candidate.exists():
            return candidate
    return data_dir / name


def _image_folder(data_dir: Path, folder: str) -> Path:
    path = _find(data_dir, folder, ("", "images", "Images/mscoco"))
    if not path.is_dir():
        raise DataError(f"missing image folder {data_dir / folder}; expected layout: {VQAV2_LAYOUT}")
    return path


def _answers_by_question(annotations: list[dict], path: Path) -> dict[int, tuple[int, tuple[str, ...], str, str]]:
    out = {}
    for ann in annotations:
        try:
            answers = tuple(a["answer"] for a in ann["answers"])
            out[ann["question_id"]] = (ann["image_id"], answers, ann.get("answer_type"), ann.get("question_type"))
        except (KeyError, TypeError):
            raise DataError(f"{path}: annotation {ann.get('question_id', '?')} lacks question_id, image_id or answers") from None
    return out


def read_vqav2(data_dir: Path | str, split: str = "val") -> VqaSplit:
    """Reads a VQAv2 split from the official files.

    Args:
        data_dir: the folder holding the files (see the module docstring).
        split: ``train``, ``val``, ``test-dev`` or ``test``.

    Returns:
        The split; for ``test-dev``/``test`` without answers (``has_answers`` False).

    Raises:
        DataError: an unknown split, a missing file or image folder (naming it and the layout), or a
            question without an annotation / an annotation without a question / disagreeing image
            ids (naming the first offending question id).
    """
    data_dir = Path(data_dir)
    if split not in VQAV2_FILES:
        raise DataError(f"unknown VQAv2 split {split!r}; known: {', '.join(VQAV2_FILES)}")
    q_name, a_name, folder = VQAV2_FILES[split]
    q_path = _find(data_dir, q_name, ("", "Questions"))
    raw_questions = load_json(q_path, VQAV2_LAYOUT).get("questions")
    if not isinstance(raw_questions, list):
        raise DataError(f"{q_path} has no 'questions' list; expected the official VQAv2 questions file")
    try:
        questions = [(q["question_id"], q["question"], q["image_id"]) for q in raw_questions]
    except (KeyError, TypeError):
        raise DataError(f"{q_path}: every question needs question_id, question and image_id") from None
    del raw_questions
    image_dir = _image_folder(data_dir, folder)
    prefix = f"COCO_{folder}_"
    source = str(q_path)
    answers: dict[int, tuple[int, tuple[str, ...], str, str]] = {}
    if a_name is not None:
        a_path = _find(data_dir, a_name, ("", "Annotations"))
        raw = load_json(a_path, VQAV2_LAYOUT).get("annotations")
        if not isinstance(raw, list):
            raise DataError(f"{a_path} has no 'annotations' list; expected the official VQAv2 annotations file")
        answers = _answers_by_question(raw, a_path)
        del raw
        _check_matching(questions, answers, q_path, a_path)
        source += f", {a_path}"

    make = partial(_make_example, questions, answers, image_dir, prefix)
    return VqaSplit(LazyRecords(len(questions), make), split, a_name is not None, source)


def _make_example(questions: list[tuple], answers: dict[int, tuple], image_dir: Path, prefix: str, i: int) -> VqaExample:
    qid, text, image_id = questions[i]
    image = image_dir / f"{prefix}{int(image_id):012d}.jpg"
    if not answers:
        return VqaExample(qid, text, image, image_id)
    _, gts, answer_type, question_type = answers[qid]
    return VqaExample(qid, text, image, image_id, gts, answer_type, question_type)


def _check_matching(questions: list[tuple], answers: dict[int, tuple], q_path: Path, a_path: Path) -> None:
    """Every question has an annotation with the same image and vice versa; names the first offender."""
    seen = set()
    for qid, _, image_id in questions:
        if qid in seen:
            raise DataError(f"question {qid} appears twice in {q_path}")
        seen.add(qid)
        if qid not in answers:
            raise DataError(f"question {qid} in {q_path.name} has no annotation in {a_path.name}")
        if answers[qid][0] != image_id:
            raise DataError(f"question {qid}: image {image_id} in {q_path.name} but {answers[qid][0]} in {a_path.name}")
    if len(answers) != len(seen):
        extra = next(qid for qid in answers if qid not in seen)
        raise DataError(f"annotation for question {extra} in {a_path.name} has no question in {q_path.name}")
