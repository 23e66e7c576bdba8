"""Which adapter can serve which method: both declare where tokens can be reduced.

An adapter lists the places its backbone offers (``Adapter.placements``), a method the places it
can act at (``ReductionMethod.placements``); they fit when the sets share one. Shared code never
compares names: a new backbone or method only declares its placements.

- ``"encoder-layer"``: inside the layers of a bidirectional encoder (ViLT, METER, BridgeTower, ViTs).
- ``"decoder-layer"``: between the layers of a causal decoder during the prefill (LLaVA).
- ``"decoder-input"``: on the projected image tokens before the decoder (LLaVA).
"""
from __future__ import annotations

from typing import Any

from pumer_plug.errors import UserError

#: the order in which an adapter picks a placement when a method could act at several
ORDER = ("encoder-layer", "decoder-layer", "decoder-input")


def placement(adapter: Any, method: Any) -> str:
    """Returns the place where ``method`` reduces tokens on ``adapter``'s backbone.

    Raises:
        UserError: naming the method, the adapter and both sets of placements when they share none.
    """
    common = set(adapter.placements) & set(method.placements)
    if not common:
        raise UserError(
            f"method {method.name!r} cannot run on adapter {adapter.name!r}: the method acts at "
            f"{sorted(method.placements)}, the {adapter.name} backbone offers {sorted(adapter.placements)}"
        )
    return next(p for p in ORDER if p in common)
