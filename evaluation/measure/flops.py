"""FLOPs of one real forward (``torch.utils.flop_counter.FlopCounterMode``), reduced tokens included."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .variants import AttachFn, Batch, _resolve_device, to_device, attached, batch_size_of, inference


def _count_flops(model: nn.Module, batch: Batch, attach: AttachFn | None,
                 device: torch.device | str | None) -> tuple[FlopCounterMode, int]:
    batch = to_device(batch, _resolve_device(model, device))
    # FlopCounterMode has no formula for the fused CPU/flash SDPA kernels and would silently skip
    # attention; the math backend is counted op by op.
    with inference(model), attached(model, attach), sdpa_kernel([SDPBackend.MATH]), \
            FlopCounterMode(display=False) as counter:
        model(**batch)
    return counter, batch_size_of(batch)


def measure_flops(model: nn.Module, batch: Batch, attach: AttachFn | None = None,
                  device: torch.device | str | None = None) -> float:
    """Returns GFLOPs per example of one real forward with ``attach`` applied (dense if ``None``).

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` over the ops that actually run, so
    a method that shrinks the token count shows up here. A multiply-add counts as 2 FLOPs;
    element-wise ops count 0 (PyTorch's formulas cover matmuls, convolutions and attention).
    """
    counter, batch_size = _count_flops(model, batch, attach, device)
    return counter.get_total_flops() / batch_size / 1e9


def measure_flops_by_module(model: nn.Module, batch: Batch, attach: AttachFn | None = None,
                            device: torch.device | str | None = None) -> dict[str, float]:
    """Returns ``{module path: GFLOPs per example}`` of one forward, including ``"Global"``.

    Paths are FlopCounterMode's (``"<ModelClass>.layers.0.attention"``); a parent includes its
    children.
    """
    counter, batch_size = _count_flops(model, batch, attach, device)
    return {name: sum(ops.values()) / batch_size / 1e9
            for name, ops in counter.get_flop_counts().items()}

