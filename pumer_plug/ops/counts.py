"""Per-row token counts kept on the host and on the device at once.

Shapes need host ints (``num_out = max(lengths)``); the ops' per-row comparisons (``rank < keep``)
need the same counts as a device tensor. Copying a host list to the device at every op blocks
the host until the device catches up (a host-device sync), so a :class:`RowCounts` carries both:
it *is* the tuple of host ints, and ``.tensor`` holds the same (B,) int64 values on the device.
Adapters build the first ones from the device-side sums of the masks (the one device-to-host
sync of a forward); every count derived from them (pruned, merged, kept) is computed twice, on
the host with Python's arithmetic and on the device with the same arithmetic in float64/int64,
so no host-to-device copy is made while a forward runs.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # torch is imported where a device tensor is built, so that configs can count without it
    import torch


class RowCounts(tuple):
    """A tuple of per-row host ints with the same values on the device in ``.tensor`` (B,) int64."""

    tensor: torch.Tensor

    def __new__(cls, host: Sequence[int], tensor: torch.Tensor) -> "RowCounts":
        counts = super().__new__(cls, (int(n) for n in host))
        counts.tensor = tensor
        return counts

    def __reduce__(self):  # pickles as a plain tuple
        return (tuple, (tuple(self),))


def counts_on_device(counts: Sequence[int], device: torch.device) -> torch.Tensor:
    """The counts as a (B,) int64 device tensor: free for :class:`RowCounts`; a host-to-device
    copy (a sync) for plain sequences, the path of hand-built inputs and the ops' loop tests."""
    import torch

    if isinstance(counts, RowCounts) and counts.tensor.device == torch.device(device):
        return counts.tensor
    return torch.tensor(tuple(counts), dtype=torch.int64, device=device)


def row_counts(counts: Sequence[int], device: torch.device) -> RowCounts:
    """``counts`` as :class:`RowCounts` on ``device`` (a copy only when they are plain host ints)."""
    import torch

    if isinstance(counts, RowCounts) and counts.tensor.device == torch.device(device):
        return counts
    return RowCounts(counts, counts_on_device(counts, device))


def add_counts(a: Sequence[int], b: Sequence[int], sign: int = 1) -> tuple[int, ...]:
    """``a + sign * b`` per row; an empty side counts as zeros. Stays on the device when both are RowCounts."""
    if not b:
        return a
    if not a:
        return b if sign == 1 else tuple(-n for n in b)
    host = tuple(x + sign * y for x, y in zip(a, b))
    if isinstance(a, RowCounts) and isinstance(b, RowCounts):
        return RowCounts(host, a.tensor + sign * b.tensor)
    return host


def sum_counts(parts: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """Per-row sum over segments."""
    total: tuple[int, ...] = ()
    for part in parts:
        total = add_counts(total, part)
    return total


def offset_counts(counts: Sequence[int], offset: int) -> tuple[int, ...]:
    """``n + offset`` per row (e.g. the unprotected tokens, ``offset = -num_protected``)."""
    host = tuple(n + offset for n in counts)
    return RowCounts(host, counts.tensor + offset) if isinstance(counts, RowCounts) else host


def prune_count(num_tokens, prune_ratio: float, num_protected: int):
    """Image tokens pruned from a row with ``num_tokens`` real tokens (PuMer Alg. 1 line 2).

    ``k' = (1 - k)|V|`` tokens are kept; protected tokens are always kept, so at most
    ``num_tokens - num_protected`` tokens are pruned. Rounds as the released code does, with
    Python's ``round()`` (half to even): 0.1 x 145 = 14.5 -> 14. Takes an int or RowCounts.
    """
    if isinstance(num_tokens, RowCounts):
        n = num_tokens.tensor
        device = (n.double() * prune_ratio).round().long().minimum(n - num_protected).clamp_min(0)
        return RowCounts((prune_count(m, prune_ratio, num_protected) for m in num_tokens), device)
    return max(0, min(round(prune_ratio * num_tokens), num_tokens - num_protected))


def merge_count(num_tokens, merge_ratio: float, num_protected: int):
    """Tokens removed by merging in a row with ``num_tokens`` real tokens (PuMer Alg. 1 line 8).

    ``r' = r|X|``, capped, as in ToMe, at half of the mergeable tokens: bipartite matching can
    remove at most one token per edge and each side holds half of them. Rounds half to even,
    as the released code does (``round(merge_ratio * length)``). Takes an int or RowCounts.
    """
    if isinstance(num_tokens, RowCounts):
        n = num_tokens.tensor
        device = (n.double() * merge_ratio).round().long().minimum((n - num_protected).div(2, rounding_mode="floor"))
        return RowCounts((merge_count(m, merge_ratio, num_protected) for m in num_tokens), device.clamp_min(0))
    return max(0, min(round(merge_ratio * num_tokens), (num_tokens - num_protected) // 2))


def cap_merges(merged, lengths: Sequence[int], num_protected: int) -> tuple[int, ...]:
    """``min(r, (n - p) // 2)`` per row (ToMe's cap): ``merged`` is one int for every row or per-row counts."""
    per_row = merged if isinstance(merged, (tuple, list)) else (merged,) * len(lengths)
    host = tuple(max(0, min(r, (n - num_protected) // 2)) for r, n in zip(per_row, lengths))
    if not isinstance(lengths, RowCounts):
        return host
    half = (lengths.tensor - num_protected).div(2, rounding_mode="floor")
    if isinstance(merged, RowCounts):
        return RowCounts(host, merged.tensor.minimum(half).clamp_min(0))
    if isinstance(merged, (tuple, list)):
        return host
    return RowCounts(host, half.clamp(0, merged))


def fraction_count(num_tokens, ratio: float):
    """``int(n * ratio)`` per row (DynamicViT's ``int(init_n * token_ratio[s])``). Takes an int or RowCounts."""
    if isinstance(num_tokens, RowCounts):
        device = (num_tokens.tensor.double() * ratio).floor().long()
        return RowCounts((int(n * ratio) for n in num_tokens), device)
    return int(num_tokens * ratio)


def min_counts(a: Sequence[int], b: Sequence[int]) -> tuple[int, ...]:
    """Per-row minimum."""
    host = tuple(min(x, y) for x, y in zip(a, b))
    if isinstance(a, RowCounts) and isinstance(b, RowCounts):
        return RowCounts(host, a.tensor.minimum(b.tensor))
    return host
