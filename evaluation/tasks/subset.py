"""``--limit N``: a fixed, seeded subset of a split, and the sentence that says so in every output."""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from .data_files import DataError

T = TypeVar("T")


@dataclass(frozen=True)
class Subset:
    """The examples a run uses.

    Attributes:
        indices: positions in the split, ascending (so outputs keep the split's order).
        total: size of the whole split.
        seed: the seed the subset was drawn with (None: the whole split).
        unit: what an example is called in the description ("questions", "pairs", ...).
    """

    indices: tuple[int, ...]
    total: int
    seed: int | None
    unit: str = "examples"

    @property
    def is_full(self) -> bool:
        """Whether the subset is the whole split."""
        return len(self.indices) == self.total

    def describe(self) -> str:
        """``"2000 of 214354 questions, seed 0"``, or ``"all 214354 questions"``."""
        if self.is_full:
            return f"all {self.total} {self.unit}"
        return f"{len(self.indices)} of {self.total} {self.unit}, seed {self.seed}"

    def take(self, records: Sequence[T]) -> list[T]:
        """The subset's records, in split order.

        Raises:
            DataError: ``records`` is not the split the subset was drawn from (its size differs).
        """
        if len(records) != self.total:
            raise DataError(f"subset was drawn from {self.total} {self.unit}, not {len(records)}")
        return [records[i] for i in self.indices]


def seeded_subset(total: int, limit: int | None, seed: int = 0, unit: str = "examples") -> Subset:
    """Draws ``limit`` of ``total`` positions with a fixed seed; None or ``limit == total``: everything.

    The same (total, limit, seed) always gives the same subset, on every machine and Python version
    (``random.Random(seed).sample``), so methods compared in separate runs see the same examples.

    Raises:
        DataError: ``limit`` is not positive or is larger than the split (nothing is silently
            evaluated on fewer examples than asked).

    Example:
        >>> seeded_subset(10, 3).describe()
        '3 of 10 examples, seed 0'
    """
    if limit is None or limit == total:
        return Subset(tuple(range(total)), total, None, unit)
    if limit <= 0:
        raise DataError(f"--limit must be positive, got {limit}")
    if limit > total:
        raise DataError(f"--limit {limit} asks for more than the {total} {unit} in the split")
    indices = sorted(random.Random(seed).sample(range(total), limit))
    return Subset(tuple(indices), total, seed, unit)
