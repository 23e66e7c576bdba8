"""Classification accuracy over predicted labels (NLVR2, SNLI-VE, custom sets) and NLVR2 consistency."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Mapping
from dataclasses import dataclass

from .data_files import DataError


@dataclass(frozen=True)
class ClassificationScore:
    """Accuracy of predicted labels.

    Attributes:
        accuracy: fraction correct in [0, 1].
        num_correct: examples whose prediction equals the gold label.
        num_examples: examples scored.
        per_class: gold label -> accuracy on the examples with that label (recall per class).
    """

    accuracy: float
    num_correct: int
    num_examples: int
    per_class: dict[str, float]


def _check_ids(predicted: Mapping[Hashable, str], gold: Mapping[Hashable, str]) -> None:
    missing = next((i for i in gold if i not in predicted), None)
    if missing is not None:
        raise DataError(f"no prediction for example {missing!r}; every example scored needs one")
    extra = next((i for i in predicted if i not in gold), None)
    if extra is not None:
        raise DataError(f"prediction for example {extra!r}, which is not among the {len(gold)} examples scored")
    if not gold:
        raise DataError("no examples to score")


def label_accuracy(predicted: Mapping[Hashable, str], gold: Mapping[Hashable, str]) -> ClassificationScore:
    """Accuracy of predicted label strings against gold label strings, matched by example id.

    Raises:
        DataError: an example has no prediction or a prediction has no example (first id named).
    """
    _check_ids(predicted, gold)
    hits: dict[str, list[bool]] = defaultdict(list)
    for example_id, label in gold.items():
        hits[label].append(predicted[example_id] == label)
    correct = sum(sum(v) for v in hits.values())
    return ClassificationScore(
        accuracy=correct / len(gold),
        num_correct=correct,
        num_examples=len(gold),
        per_class={label: sum(v) / len(v) for label, v in sorted(hits.items())},
    )


def nlvr2_consistency(predicted: Mapping[str, str], gold: Mapping[str, str]) -> float:
    """NLVR2 consistency as the official ``nlvr2/eval/metrics.py``: the fraction of sentences whose
    predictions are correct on every image pair they were written for.

    Examples are grouped by their identifier ``split-set_id-pair_id-sentence_id`` with ``pair_id``
    blanked; labels compare case-insensitively as the official script does.

    Raises:
        DataError: ids disagree as in :func:`label_accuracy`.
    """
    _check_ids(predicted, gold)
    consistent: dict[str, bool] = {}
    for identifier, label in gold.items():
        parts = identifier.split("-")
        if len(parts) > 2:
            parts[2] = ""
        key = "-".join(parts)
        correct = predicted[identifier].lower() == label.lower()
        consistent[key] = consistent.get(key, True) and correct
    return sum(consistent.values()) / len(consistent)
