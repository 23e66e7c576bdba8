"""The largest batch that fits in CUDA memory (``--find-batch-size``): accelerate's search, then a bisection."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from pumer_plug.errors import UserError

from .variants import AttachFn, Batch, _resolve_device, _synchronize, to_device, attached, inference

def search_batch_size(fits: Callable[[int], bool], start: int = 1,
                      max_batch_size: int = 4096) -> int:
    """Returns the largest batch size in ``[start, max_batch_size]`` for which ``fits`` is true.

    Doubles from ``start`` until a size does not fit (or the cap), then binary-searches between
    the last size that fit and the first that did not. Assumes ``fits`` is monotone.

    Raises:
        ValueError: if ``start < 1``, ``max_batch_size < start``, or ``start`` does not fit.
    """
    if start < 1 or max_batch_size < start:
        raise ValueError(f"need 1 <= start <= max_batch_size, got {start} and {max_batch_size}")
    if not fits(start):
        raise ValueError(f"batch size {start} (the start) does not fit; lower --batch-size")
    good, bad = start, max_batch_size + 1
    while good < max_batch_size:
        trial = min(2 * good, max_batch_size)
        if not fits(trial):
            bad = trial
            break
        good = trial
    while bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    return good




def _forward(model: nn.Module, make_batch: Callable[[int], Batch], attach: AttachFn | None,
             device: torch.device, batch_size: int) -> None:
    """One inference forward at ``batch_size``; raises whatever running out of memory raises."""
    with inference(model), attached(model, attach):
        model(**to_device(make_batch(batch_size), device))
    _synchronize(device)


def _oom_probe(model: nn.Module, make_batch: Callable[[int], Batch], attach: AttachFn | None,
               device: torch.device) -> Callable[[int], bool]:
    """Returns ``fits(batch_size)``: one forward that is False on ``torch.OutOfMemoryError``."""

    def fits(batch_size: int) -> bool:
        out_of_memory = False
        try:
            _forward(model, make_batch, attach, device, batch_size)
        except torch.OutOfMemoryError:
            out_of_memory = True  # free outside the except block: the traceback holds tensors
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return not out_of_memory

    return fits


def find_batch_size(model: nn.Module, make_batch: Callable[[int], Batch],
                    attach: AttachFn | None = None, max_batch_size: int = 1024,
                    device: torch.device | str | None = None) -> int:
    """Returns the largest batch size up to ``max_batch_size`` whose forward fits in CUDA memory.

    ``accelerate.utils.find_executable_batch_size`` halves from ``max_batch_size`` until a forward
    runs; a bisection between that size and twice it then finds the largest one that fits. Pass
    the most memory-hungry variant (usually the dense model, ``attach=None``) so that every
    compared variant can run at the returned size.

    Args:
        make_batch: ``make_batch(batch_size)`` returns a batch dict of that size.

    Raises:
        UserError: the device is not CUDA (a CPU process is killed rather than told it is out of
            memory), or not even one example fits.
    """
    from accelerate.utils import find_executable_batch_size

    device = _resolve_device(model, device)
    if device.type != "cuda":
        raise UserError(f"--find-batch-size needs a CUDA device, got {device}; pass --batch-size instead")

    @find_executable_batch_size(starting_batch_size=max_batch_size)
    def halving(batch_size: int) -> int:
        _forward(model, make_batch, attach, device, batch_size)
        return batch_size

    try:
        fitting = halving()
    except RuntimeError as error:  # accelerate: "No executable batch size found, reached zero."
        raise UserError(f"not even one example fits in {device} memory ({error})") from None
    torch.cuda.empty_cache()
    ceiling = min(2 * fitting - 1, max_batch_size)
    return search_batch_size(_oom_probe(model, make_batch, attach, device), fitting, ceiling)
