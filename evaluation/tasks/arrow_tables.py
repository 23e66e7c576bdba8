"""The arrow tables ViLT's and METER's ``write_*`` scripts produce (images as encoded bytes).

Arrow IPC *file* format (``pa.RecordBatchFileWriter``), read memory-mapped: nothing but the
columns' offsets is loaded until a record is built. Tables and columns (dandelin/ViLT
``vilt/utils/write_vqa.py``, ``write_nlvr2.py``, ``write_f30k_karpathy.py``; zdou0830/METER
``meter/utils/write_snli.py``), one row per image (pair), with a list of texts per row::

    vqav2_{split}.arrow                  image, questions, answers, answer_labels, answer_scores, image_id, question_id, split
    nlvr2_{split}.arrow                  image_0, image_1, questions, answers ("True"/"False"), identifier (no sentence id)
    snli_{split}.arrow                   image, sentences ([premise, hypothesis]), labels (0 contradiction, 1 neutral, 2 entailment)
    f30k_caption_karpathy_{split}.arrow  image, caption, image_id (file name), split

The VQA tables keep only the answers in ViLT's label space with their soft scores, not the 10 raw
answers, so a VQA score computed on them is ViLT's (:func:`~.vqa_metric.soft_score_accuracy`), not
the official one. The NLVR2 tables drop the sentence id: records get ``<pair identifier>#<j>``.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from .data_files import DataError, LazyRecords, require_file
from .flickr30k import RetrievalSplit
from .nlvr2 import Nlvr2Example
from .snli_ve import SNLI_VE_LABELS, SnliVeExample
from .vqav2 import VqaExample, VqaSplit

ARROW_COLUMNS = {
    "vqav2": ("image", "questions", "answers", "answer_scores", "image_id", "question_id"),
    "nlvr2": ("image_0", "image_1", "questions", "answers", "identifier"),
    "snli": ("image", "sentences", "labels"),
    "f30k": ("image", "caption", "image_id"),
}
ARROW_LAYOUT = "<data-dir>/vqav2_{split}.arrow | nlvr2_{split}.arrow | snli_{split}.arrow | f30k_caption_karpathy_{split}.arrow"


def open_arrow_table(path: Path, kind: str):
    """Opens an arrow IPC file memory-mapped and checks it has ``kind``'s columns.

    Returns:
        The ``pyarrow.Table`` (zero-copy over the mapped file).

    Raises:
        DataError: the file is missing, is not an arrow IPC file, or lacks a column (naming it).
    """
    import pyarrow as pa

    require_file(path, ARROW_LAYOUT)
    try:
        table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path} is not an arrow IPC file as ViLT/METER write them: {e}") from None
    missing = [c for c in ARROW_COLUMNS[kind] if c not in table.column_names]
    if missing:
        raise DataError(f"{path} lacks column {missing[0]!r} (has {', '.join(table.column_names)})")
    return table


class ArrowTable:
    """A memory-mapped arrow table that pickles as its path (DataLoader workers re-map the file).

    Args:
        path: the ``.arrow`` file.
        kind: a key of :data:`ARROW_COLUMNS`, checked on opening.
    """

    def __init__(self, path: Path, kind: str):
        self.path, self.kind = path, kind
        self._table = open_arrow_table(path, kind)

    @property
    def table(self):
        """The ``pyarrow.Table``, mapped on first use in this process."""
        if self._table is None:
            self._table = open_arrow_table(self.path, self.kind)
        return self._table

    def cell(self, row: int, column: str) -> Any:
        """The Python value of one cell (one image's bytes are read only here)."""
        return self.table.column(column)[row].as_py()

    def list_index(self, column: str) -> list[tuple[int, int]]:
        """(row, position in the row's list) of every entry of a list column, in table order."""
        lengths = [len(texts) for texts in self.table.column(column).to_pylist()]
        return [(row, j) for row, n in enumerate(lengths) for j in range(n)]

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "_table": None}


def read_vqav2_arrow(data_dir: Path | str, split: str = "val") -> VqaSplit:
    """Reads ViLT's ``vqav2_<split>.arrow`` (``train``, ``val``, ``trainable_val``, ``rest_val``, ``test``, ``test-dev``).

    Raises:
        DataError: as :func:`open_arrow_table`.
    """
    table = ArrowTable(Path(data_dir) / f"vqav2_{split}.arrow", "vqav2")
    index = table.list_index("questions")
    has_answers = bool(index) and bool(table.cell(index[0][0], "answers"))
    return VqaSplit(LazyRecords(len(index), partial(_vqa_record, table, index)), split, has_answers, str(table.path))


def _vqa_record(table: ArrowTable, index: list[tuple[int, int]], i: int) -> VqaExample:
    row, j = index[i]
    answers, scores = table.cell(row, "answers"), table.cell(row, "answer_scores")
    return VqaExample(
        question_id=table.cell(row, "question_id")[j],
        question=table.cell(row, "questions")[j],
        image=table.cell(row, "image"),
        image_id=table.cell(row, "image_id"),
        answer_scores=tuple(zip(answers[j], scores[j])) if answers else (),
    )


def read_nlvr2_arrow(data_dir: Path | str, split: str = "dev") -> Sequence[Nlvr2Example]:
    """Reads ViLT's ``nlvr2_<split>.arrow``; identifiers are ``<pair identifier>#<j>``.

    Raises:
        DataError: as :func:`open_arrow_table`.
    """
    table = ArrowTable(Path(data_dir) / f"nlvr2_{split}.arrow", "nlvr2")
    index = table.list_index("questions")
    return LazyRecords(len(index), partial(_nlvr2_record, table, index))


def _nlvr2_record(table: ArrowTable, index: list[tuple[int, int]], i: int) -> Nlvr2Example:
    row, j = index[i]
    labels = table.cell(row, "answers")
    images = (table.cell(row, "image_0"), table.cell(row, "image_1"))
    identifier = f"{table.cell(row, 'identifier')}#{j}"
    return Nlvr2Example(identifier, table.cell(row, "questions")[j], images, str(labels[j]) if labels else None)


def read_snli_ve_arrow(data_dir: Path | str, split: str = "test") -> Sequence[SnliVeExample]:
    """Reads METER's ``snli_<split>.arrow`` (also found as ``snli_ve_<split>.arrow``); ids are ``row<r>#<j>``.

    Raises:
        DataError: as :func:`open_arrow_table`; building a record with a label id outside 0..2.
    """
    path = Path(data_dir) / f"snli_{split}.arrow"
    if not path.is_file() and (Path(data_dir) / f"snli_ve_{split}.arrow").is_file():
        path = Path(data_dir) / f"snli_ve_{split}.arrow"
    table = ArrowTable(path, "snli")
    index = table.list_index("sentences")
    return LazyRecords(len(index), partial(_snli_record, table, index))


def _snli_record(table: ArrowTable, index: list[tuple[int, int]], i: int) -> SnliVeExample:
    row, j = index[i]
    premise, hypothesis = table.cell(row, "sentences")[j]
    label_id = table.cell(row, "labels")[j]
    if not 0 <= label_id < len(SNLI_VE_LABELS):
        raise DataError(f"{table.path} row {row}: label {label_id} is not 0, 1 or 2")
    return SnliVeExample(f"row{row}#{j}", hypothesis, table.cell(row, "image"), f"row{row}", SNLI_VE_LABELS[label_id], premise)


def read_f30k_arrow(data_dir: Path | str, split: str = "test") -> RetrievalSplit:
    """Reads ViLT's ``f30k_caption_karpathy_<split>.arrow`` into a gallery (images as bytes, all captions kept).

    ViLT's dataset drops exact duplicate captions of an image; here every caption is kept, as in the
    Karpathy JSON.

    Raises:
        DataError: as :func:`open_arrow_table`.
    """
    table = ArrowTable(Path(data_dir) / f"f30k_caption_karpathy_{split}.arrow", "f30k")
    captions = table.table.column("caption").to_pylist()
    texts = tuple(c for row in captions for c in row)
    text_image = tuple(i for i, row in enumerate(captions) for _ in row)
    images = LazyRecords(len(captions), partial(table.cell, column="image"))
    return RetrievalSplit(tuple(table.table.column("image_id").to_pylist()), images, texts, text_image)
