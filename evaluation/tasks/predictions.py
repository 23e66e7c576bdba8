"""Prediction files in the official formats, written into one folder per method.

Layout of an output folder (``--output-dir``)::

    <output-dir>/<method>/vqav2_<split>_results.json    VQA results: [{"question_id": int, "answer": str}]
    <output-dir>/<method>/nlvr2_<split>_predictions.csv identifier,prediction (True/False), no header
    <output-dir>/<method>/snli-ve_<split>_predictions.csv pairID,prediction (entailment/neutral/contradiction)
    <output-dir>/<method>/run_info.json                 what was evaluated (subset, skipped images, label coverage)

The VQA file is what the official ``vqaEval.py`` and the EvalAI test-dev server read; the CSV is
what NLVR2's ``eval/metrics.py`` reads (first value the identifier, second the label as in the
JSON). A run never replaces a file it did not create unless told to, and then says so.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .data_files import DataError

logger = logging.getLogger(__name__)

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")


class RunOutputs:
    """The files of one run under ``root/<method>/``; refuses to replace a file the run did not create.

    Args:
        root: the output folder (created on first write).
        overwrite: replace existing files the run did not create, logging a warning for each
            (``--overwrite``); the replaced paths are kept in :attr:`replaced`.

    Example:
        >>> import tempfile
        >>> outputs = RunOutputs(Path(tempfile.mkdtemp()))
        >>> outputs.write_text("pumer", "notes.txt", "hi").name
        'notes.txt'
    """

    def __init__(self, root: Path | str, overwrite: bool = False):
        self.root = Path(root)
        self.overwrite = overwrite
        self.created: set[Path] = set()
        self.replaced: list[Path] = []

    def path(self, method: str, filename: str) -> Path:
        """The path of ``filename`` in the method's folder, checked for writing.

        Raises:
            DataError: the method or file name is not a plain name, or the file exists, was not
                written by this run, and ``overwrite`` is off.
        """
        for name in (method, filename):
            if not _SAFE_NAME.match(name):
                raise DataError(f"output name {name!r} must be a plain file name (letters, digits, . _ + = -)")
        path = self.root / method / filename
        if path.exists() and path not in self.created:
            if not self.overwrite:
                raise DataError(f"{path} exists and was not written by this run; choose another output folder "
                                "or pass --overwrite to replace it")
            logger.warning("replacing %s, which this run did not create (--overwrite)", path)
            self.replaced.append(path)
        return path

    def write_text(self, method: str, filename: str, text: str) -> Path:
        """Writes ``text`` to ``root/method/filename`` (see :meth:`path`) and returns the path."""
        path = self.path(method, filename)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        self.created.add(path)
        return path


def write_vqa_results(outputs: RunOutputs, method: str, split: str, answers: Mapping[int | str, str]) -> Path:
    """Writes VQA answers in the official results format, ordered by question id.

    Args:
        answers: question id -> answer string (VQAv2 ids are ints; a custom set's may be strings,
            written as given).

    Returns:
        The path of ``vqav2_<split>_results.json``.
    """
    ordered = sorted(answers, key=lambda qid: (isinstance(qid, str), qid))  # ints first, then strings
    results = [{"question_id": qid, "answer": str(answers[qid])} for qid in ordered]
    return outputs.write_text(method, f"vqav2_{split}_results.json", json.dumps(results))


def read_vqa_results(path: Path | str) -> dict[int | str, str]:
    """Reads an official VQA results file into question id -> answer.

    Raises:
        DataError: the file is not a list of ``{"question_id": int, "answer": str}`` or repeats a question.
    """
    path = Path(path)
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read VQA results {path}: {e}") from None
    if not isinstance(results, list):
        raise DataError(f"{path}: VQA results must be a JSON list of objects")
    answers: dict[int | str, str] = {}
    for item in results:
        if not (isinstance(item, dict) and isinstance(item.get("question_id"), (int, str)) and isinstance(item.get("answer"), str)):
            raise DataError(f"{path}: each result needs a question_id and a str answer; got {item!r}")
        if item["question_id"] in answers:
            raise DataError(f"{path}: question {item['question_id']} is answered twice")
        answers[item["question_id"]] = item["answer"]
    return answers


def write_label_predictions(
    outputs: RunOutputs, method: str, task: str, split: str, predictions: Mapping[str, str]
) -> Path:
    """Writes ``identifier,prediction`` rows (no header, in the given order) as NLVR2's ``metrics.py`` reads.

    Args:
        task: ``nlvr2``, ``snli-ve`` or a custom set's name (goes into the file name).
        predictions: example id -> predicted label string (``True``/``False`` for NLVR2).

    Returns:
        The path of ``<task>_<split>_predictions.csv``.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    for example_id, label in predictions.items():
        writer.writerow([example_id, label])
    return outputs.write_text(method, f"{task}_{split}_predictions.csv", buffer.getvalue())


def read_label_predictions(path: Path | str) -> dict[str, str]:
    """Reads an ``identifier,prediction`` CSV into id -> label.

    Raises:
        DataError: a row does not have two values or an id repeats (naming the row).
    """
    path = Path(path)
    out: dict[str, str] = {}
    with path.open(encoding="utf-8", newline="") as f:
        for number, row in enumerate(csv.reader(f), start=1):
            if not row:
                continue
            if len(row) != 2:
                raise DataError(f"{path} row {number}: expected identifier,prediction; got {row!r}")
            if row[0] in out:
                raise DataError(f"{path} row {number}: {row[0]!r} is predicted twice")
            out[row[0]] = row[1]
    return out


def write_run_info(outputs: RunOutputs, method: str, info: Mapping[str, Any]) -> Path:
    """Writes ``run_info.json``: what was evaluated (e.g. ``{"examples": "2000 of 214354 questions, seed 0",
    "skipped_examples": 0, "label_coverage": "..."}``), so a file never looks like a full-split result."""
    return outputs.write_text(method, "run_info.json", json.dumps(dict(info), indent=2, sort_keys=True))
