"""A model's answer (label) space: mapping dataset answers to label ids, and VQA soft-score targets.

Label spaces come from the model (``config.id2label``) or a given table (METER's answer list).
Answers the model cannot produce are counted in a :class:`LabelCoverage`, never dropped silently.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .data_files import DataError

#: ViLT ``write_vqa.get_score``: the soft target of an answer given by ``count`` of the 10
#: annotators; it equals the official per-question accuracy of predicting that answer
VQA_SCORE_BY_COUNT = {0: 0.0, 1: 0.3, 2: 0.6, 3: 0.9}


def vqa_score(count: int) -> float:
    """ViLT's soft score for an answer given by ``count`` annotators: 0, 0.3, 0.6, 0.9, then 1.0."""
    return VQA_SCORE_BY_COUNT.get(count, 1.0)


@dataclass(frozen=True)
class AnswerSpace:
    """The answers a model can produce, in label-id order.

    Attributes:
        labels: answer string of each label id (``labels[i]`` is id ``i``).
    """

    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for label in self.labels:
            if label in seen:
                raise DataError(f"answer space lists {label!r} twice")
            seen.add(label)
        object.__setattr__(self, "_index", {label: i for i, label in enumerate(self.labels)})

    @classmethod
    def from_id2label(cls, id2label: Mapping[int | str, str]) -> AnswerSpace:
        """Builds the space from a model config's ``id2label`` (keys may be ints or digit strings).

        Raises:
            DataError: the ids are not exactly 0..n-1 or an answer repeats.
        """
        by_id = {int(k): v for k, v in id2label.items()}
        if sorted(by_id) != list(range(len(by_id))):
            raise DataError(f"id2label ids must be 0..{len(by_id) - 1}; got {sorted(by_id)[:5]}...")
        return cls(tuple(by_id[i] for i in range(len(by_id))))

    def __len__(self) -> int:
        return len(self.labels)

    def label_id(self, answer: str) -> int | None:
        """The label id of ``answer``, or None if the model cannot produce it."""
        return self._index.get(answer)  # type: ignore[attr-defined]

    def answer(self, label_id: int) -> str:
        """The answer string of a label id."""
        return self.labels[label_id]


@dataclass(frozen=True)
class LabelCoverage:
    """How many dataset answers the model can produce.

    Attributes:
        num_total: answers (or labels) looked up.
        num_missing: of these, answers not in the model's space.
        missing_examples: up to 10 distinct missing answers, for the report.
    """

    num_total: int
    num_missing: int
    missing_examples: tuple[str, ...]

    def describe(self) -> str:
        """One line for the output, e.g. ``"3 of 120 answers not in the model's 3129 labels: 'x', 'y'"``."""
        if not self.num_missing:
            return f"all {self.num_total} answers are in the model's label space"
        shown = ", ".join(repr(a) for a in self.missing_examples)
        return f"{self.num_missing} of {self.num_total} answers are not in the model's label space (e.g. {shown})"


def map_labels(answers: Iterable[str], space: AnswerSpace) -> tuple[list[int | None], LabelCoverage]:
    """Maps answer strings (or class names) to label ids, counting those the model cannot produce.

    Returns:
        ids: the label id of each answer, None where the model has no such label.
        coverage: the counts, for the output.
    """
    ids: list[int | None] = []
    missing: list[str] = []
    for answer in answers:
        label_id = space.label_id(answer)
        ids.append(label_id)
        if label_id is None:
            missing.append(answer)
    examples = tuple(dict.fromkeys(missing))[:10]
    return ids, LabelCoverage(num_total=len(ids), num_missing=len(missing), missing_examples=examples)


@dataclass(frozen=True)
class SoftTargets:
    """VQA training targets of one question in ViLT's scheme.

    Attributes:
        label_ids: label ids of the annotators' answers that the model can produce.
        scores: ``vqa_score(count)`` of each, same order.
        num_unmapped: distinct annotator answers the model cannot produce (not in the targets).
    """

    label_ids: tuple[int, ...]
    scores: tuple[float, ...]
    num_unmapped: int

    def dense(self, num_labels: int):
        """The target as a dense float tensor, shape ``(num_labels,)`` (for BCE as ViLT trains)."""
        import torch

        target = torch.zeros(num_labels)
        target[list(self.label_ids)] = torch.tensor(self.scores, dtype=target.dtype)
        return target


def vqa_soft_targets(answers: Sequence[str], space: AnswerSpace) -> SoftTargets:
    """Soft-score targets from the annotators' raw answers, as ViLT's ``write_vqa.py`` builds them.

    Each distinct raw answer string is counted (no normalization, as ViLT) and, if the model has it
    as a label, gets ``vqa_score(count)``. A question none of whose answers the model has gets empty
    targets; ViLT drops such questions from training, callers here count them via ``num_unmapped``.

    Example:
        >>> t = vqa_soft_targets(["2"] * 3 + ["3"], AnswerSpace(("2", "3")))
        >>> t.label_ids, t.scores
        ((0, 1), (0.9, 0.3))
    """
    counts: dict[str, int] = {}
    for answer in answers:
        counts[answer] = counts.get(answer, 0) + 1
    ids, scores, unmapped = [], [], 0
    for answer, count in counts.items():
        label_id = space.label_id(answer)
        if label_id is None:
            unmapped += 1
            continue
        ids.append(label_id)
        scores.append(vqa_score(count))
    return SoftTargets(tuple(ids), tuple(scores), unmapped)
