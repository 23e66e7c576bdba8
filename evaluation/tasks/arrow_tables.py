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
from pathlib import Path

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


def _index(table, column: str) -> list[tuple[int, int]]:
    """(row, position in the row's list) of every text in a list column, in table order."""
    lengths = [len(texts) for texts in table.column(column).to_pylist()]
    return [(row, j) for row, n in enumerate(lengths) for j in range(n)]


def _cell(table, row: int, column: str):
    return table.column(column)[row].as_py()


def read_vqav2_arrow(data_dir: Path | str, split: str = "val") -> VqaSplit:
    """Reads ViLT's ``vqav2_<split>.arrow`` (``train``, ``val``, ``trainable_val``, ``rest_val``, ``test``, ``test-dev``).

    Raises:
        DataError: as :func:`open_arrow_table`.
    """
    path = Path(data_dir) / f"vqav2_{split}.arrow"
    table = open_arrow_table(path, "vqav2")
    index = _index(table, "questions")

    def make(i: int) -> VqaExample:
        row, j = index[i]
        answers, scores = _cell(table, row, "answers"), _cell(table, row, "answer_scores")
        pairs = tuple(zip(answers[j], scores[j])) if answers else ()
        return VqaExample(
            question_id=_cell(table, row, "question_id")[j],
            question=_cell(table, row, "questions")[j],
            image=_cell(table, row, "image"),
            image_id=_cell(table, row, "image_id"),
            answer_scores=pairs,
        )

    has_answers = bool(index) and bool(_cell(table, index[0][0], "answers"))
    return VqaSplit(LazyRecords(len(index), make), split, has_answers, str(path))


def read_nlvr2_arrow(data_dir: Path | str, split: str = "dev") -> Sequence[Nlvr2Example]:
    """Reads ViLT's ``nlvr2_<split>.arrow``; identifiers are ``<pair identifier>#<j>``."""
    table = open_arrow_table(Path(data_dir) / f"nlvr2_{split}.arrow", "nlvr2")
    index = _index(table, "questions")

    def make(i: int) -> Nlvr2Example:
        row, j = index[i]
        labels = _cell(table, row, "answers")
        label = str(labels[j]) if labels else None
        images = (_cell(table, row, "image_0"), _cell(table, row, "image_1"))
        return Nlvr2Example(f"{_cell(table, row, 'identifier')}#{j}", _cell(table, row, "questions")[j], images, label)

    return LazyRecords(len(index), make)


def read_snli_ve_arrow(data_dir: Path | str, split: str = "test") -> Sequence[SnliVeExample]:
    """Reads METER's ``snli_<split>.arrow`` (also found as ``snli_ve_<split>.arrow``); ids are ``row<r>#<j>``.

    Raises:
        DataError: as :func:`open_arrow_table`, or a label id outside 0..2.
    """
    path = Path(data_dir) / f"snli_{split}.arrow"
    if not path.is_file() and (Path(data_dir) / f"snli_ve_{split}.arrow").is_file():
        path = Path(data_dir) / f"snli_ve_{split}.arrow"
    table = open_arrow_table(path, "snli")
    index = _index(table, "sentences")

    def make(i: int) -> SnliVeExample:
        row, j = index[i]
        premise, hypothesis = _cell(table, row, "sentences")[j]
        label_id = _cell(table, row, "labels")[j]
        if not 0 <= label_id < len(SNLI_VE_LABELS):
            raise DataError(f"{path} row {row}: label {label_id} is not 0, 1 or 2")
        return SnliVeExample(f"row{row}#{j}", hypothesis, _cell(table, row, "image"), f"row{row}",
                             SNLI_VE_LABELS[label_id], premise)

    return LazyRecords(len(index), make)


def read_f30k_arrow(data_dir: Path | str, split: str = "test") -> RetrievalSplit:
    """Reads ViLT's ``f30k_caption_karpathy_<split>.arrow`` into a gallery (images as bytes, all captions kept)."""
    table = open_arrow_table(Path(data_dir) / f"f30k_caption_karpathy_{split}.arrow", "f30k")
    captions = table.column("caption").to_pylist()
    texts = tuple(c for row in captions for c in row)
    text_image = tuple(i for i, row in enumerate(captions) for _ in row)
    images = LazyRecords(table.num_rows, lambda i: _cell(table, i, "image"))
    return RetrievalSplit(tuple(table.column("image_id").to_pylist()), images, texts, text_image)  # type: ignore[arg-type]
