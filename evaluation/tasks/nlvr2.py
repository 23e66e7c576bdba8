"""NLVR2 as released (lil-lab/nlvr ``nlvr2/``): JSON-lines examples and image-pair folders.

Layout (``nlvr2/data/`` from the repository and the images from the direct download)::

    <data-dir>/dev.json                      JSON lines: identifier, sentence, label ("True"/"False")
    <data-dir>/dev/dev-850-0-img0.png        dev and test1: one flat folder per split
    <data-dir>/images/train/12/train-10171-0-img0.png   train: images/train/<directory>/

The JSON files are also found under ``nlvr2/data/`` or ``data/`` (balanced/unbalanced splits in
their ``balanced/`` and ``unbalanced/`` sub-folders). An identifier ``split-set_id-pair_id-sentence_id``
names its images ``split-set_id-pair_id-img0.png`` (left) and ``-img1.png`` (right); not every
``.png`` is a PNG, PIL reads the header.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from .data_files import DataError, ImageSource, LazyRecords, iter_jsonl, require_fields, safe_join

NLVR2_LAYOUT = (
    "<data-dir>/{split}.json (JSON lines with identifier, sentence, label; or nlvr2/data/{split}.json), images "
    "<data-dir>/{split}/{split}-{set}-{pair}-img0.png and -img1.png (train: <data-dir>/images/train/<directory>/)"
)
NLVR2_LABELS = ("False", "True")
_IDENTIFIER = re.compile(r"^[A-Za-z0-9]+-\d+-\d+-\d+$")


@dataclass(frozen=True)
class Nlvr2Example:
    """One sentence about a pair of images.

    Attributes:
        identifier: ``split-set_id-pair_id-sentence_id`` (``dev-850-0-0``).
        sentence: the statement to verify.
        images: (left, right) image files, or bytes (arrow tables).
        label: ``"True"`` or ``"False"``; None for unlabeled data.
    """

    identifier: str
    sentence: str
    images: tuple[ImageSource, ImageSource]
    label: str | None


def _json_path(data_dir: Path, split: str) -> Path:
    sub = split.split("_")[0] if split.startswith(("balanced_", "unbalanced_")) else ""
    for folder in (data_dir, data_dir / "data", data_dir / "nlvr2" / "data"):
        candidate = folder / sub / f"{split}.json"
        if candidate.is_file():
            return candidate
    return data_dir / f"{split}.json"


def pair_image_paths(data_dir: Path, identifier: str, directory: str | None = None) -> tuple[Path, Path]:
    """The left and right image files of an example, in the first folder of the layout that has them.

    Returns the flat-folder paths if none exists, so that decoding names the missing file.

    Raises:
        DataError: the identifier or directory would leave the data folder.
    """
    stem = identifier.rsplit("-", 1)[0]
    image_split = identifier.split("-", 1)[0]
    folders = [(image_split,), ("images", image_split)]
    if directory is not None:
        folders.insert(0, ("images", image_split, directory))
    candidates = [safe_join(data_dir, *folder, f"{stem}-img0.png") for folder in folders]
    left = next((c for c in candidates if c.is_file()), candidates[0])
    return left, left.with_name(f"{stem}-img1.png")


def read_nlvr2(data_dir: Path | str, split: str = "dev") -> Sequence[Nlvr2Example]:
    """Reads an NLVR2 split (``train``, ``dev``, ``test1``, ``balanced_dev``, ...) from the official JSON lines.

    Raises:
        DataError: the JSON file is missing (naming the layout), a line lacks a field, has a malformed
            or repeated identifier, or a label other than True/False (naming the identifier).
    """
    data_dir = Path(data_dir)
    path = _json_path(data_dir, split)
    rows: list[tuple[str, str, str | None, str | None]] = []
    seen: set[str] = set()
    for number, record in enumerate(iter_jsonl(path, NLVR2_LAYOUT), start=1):
        require_fields(record, ("identifier", "sentence"), f"{path} line {number}")
        identifier = str(record["identifier"])
        if not _IDENTIFIER.match(identifier):
            raise DataError(f"{path} line {number}: identifier {identifier!r} is not split-set_id-pair_id-sentence_id")
        if identifier in seen:
            raise DataError(f"{path}: identifier {identifier} appears twice")
        seen.add(identifier)
        label = record.get("label")
        if label is not None and str(label) not in NLVR2_LABELS:
            raise DataError(f"{path}: example {identifier} has label {label!r}, expected True or False")
        directory = record.get("directory")
        rows.append((identifier, record["sentence"], None if label is None else str(label),
                     None if directory is None else str(directory)))

    return LazyRecords(len(rows), partial(_make_example, data_dir, rows))


def _make_example(data_dir: Path, rows: list[tuple], i: int) -> Nlvr2Example:
    identifier, sentence, label, directory = rows[i]
    return Nlvr2Example(identifier, sentence, pair_image_paths(data_dir, identifier, directory), label)
