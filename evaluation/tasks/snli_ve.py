"""SNLI-VE as released (necla-ml/SNLI-VE): JSON lines per split plus the Flickr30k images.

Layout::

    <data-dir>/snli_ve_dev.jsonl                 fields Flickr30K_ID, sentence2, gold_label, pairID (sentence1 kept)
    <data-dir>/flickr30k_images/2248275918.jpg   (flickr30k-images/ or Flickr30K/images/ also found)
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from .data_files import DataError, ImageSource, LazyRecords, iter_jsonl, require_fields, safe_join

SNLI_VE_LAYOUT = (
    "<data-dir>/snli_ve_{split}.jsonl (fields Flickr30K_ID, sentence2, gold_label, pairID), "
    "images <data-dir>/flickr30k_images/{Flickr30K_ID}.jpg"
)
#: label order of METER's and PuMer's heads (contradiction 0, neutral 1, entailment 2)
SNLI_VE_LABELS = ("contradiction", "neutral", "entailment")
FLICKR30K_IMAGE_FOLDERS = ("flickr30k_images", "flickr30k-images", "Flickr30K/images", "images")


@dataclass(frozen=True)
class SnliVeExample:
    """One image premise with a text hypothesis.

    Attributes:
        pair_id: SNLI's ``pairID`` (``3416050480.jpg#4r1n``), the example's id.
        hypothesis: ``sentence2``.
        image: the Flickr30k image file (or bytes, arrow tables).
        image_id: the Flickr30k id (file name without ``.jpg``).
        label: ``entailment``, ``neutral`` or ``contradiction``; None for unlabeled data.
        premise: SNLI's text premise ``sentence1`` (a caption of the image; not used by the task).
    """

    pair_id: str
    hypothesis: str
    image: ImageSource
    image_id: str
    label: str | None
    premise: str | None = None


def find_image_folder(data_dir: Path, layout: str) -> Path:
    """The first Flickr30k image folder of :data:`FLICKR30K_IMAGE_FOLDERS` under ``data_dir``.

    Raises:
        DataError: none exists, naming the layout.
    """
    for name in FLICKR30K_IMAGE_FOLDERS:
        if (data_dir / name).is_dir():
            return data_dir / name
    raise DataError(f"missing image folder {data_dir / FLICKR30K_IMAGE_FOLDERS[0]}; expected layout: {layout}")


def read_snli_ve(data_dir: Path | str, split: str = "test") -> Sequence[SnliVeExample]:
    """Reads an SNLI-VE split (``train``, ``dev``, ``test``) from ``snli_ve_<split>.jsonl``.

    Raises:
        DataError: the file or image folder is missing (naming the layout), a line lacks a field,
            repeats a pairID, or has a label outside the three classes (naming the pairID).
    """
    data_dir = Path(data_dir)
    path = data_dir / f"snli_ve_{split}.jsonl"
    rows: list[tuple[str, str, str, str | None, str | None]] = []
    seen: set[str] = set()
    for number, record in enumerate(iter_jsonl(path, SNLI_VE_LAYOUT), start=1):
        if "Flickr30K_ID" not in record and "Flikr30kID" in record:  # the generator script's spelling
            record["Flickr30K_ID"] = record["Flikr30kID"]
        require_fields(record, ("pairID", "Flickr30K_ID", "sentence2"), f"{path} line {number}")
        pair_id = str(record["pairID"])
        if pair_id in seen:
            raise DataError(f"{path}: pairID {pair_id} appears twice")
        seen.add(pair_id)
        label = record.get("gold_label")
        if label is not None and label not in SNLI_VE_LABELS:
            raise DataError(f"{path}: example {pair_id} has gold_label {label!r}, expected one of {SNLI_VE_LABELS}")
        image_id = str(record["Flickr30K_ID"]).removesuffix(".jpg")
        safe_join(data_dir, image_id)  # refuse ids that would leave the data folder
        rows.append((pair_id, record["sentence2"], image_id, label, record.get("sentence1")))
    image_dir = find_image_folder(data_dir, SNLI_VE_LAYOUT)

    return LazyRecords(len(rows), partial(_make_example, image_dir, rows))


def _make_example(image_dir: Path, rows: list[tuple], i: int) -> SnliVeExample:
    pair_id, hypothesis, image_id, label, premise = rows[i]
    return SnliVeExample(pair_id, hypothesis, safe_join(image_dir, f"{image_id}.jpg"), image_id, label, premise)
