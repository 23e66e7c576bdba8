"""FastV (Chen et al., ECCV 2024, "An Image is Worth 1/2 Tokens After Layer 2"), on decoder VLMs.

After layer ``K - 1`` of the decoder the image tokens are ranked by the attention they receive
from the last prompt token (summed over heads) and only the top ones go on to layers ``K..``:
FastV's defaults are K = 2 and R = 50% pruned. The budget is a prune ratio or a keep count
(``keep_tokens``: 192 / 128 / 64 of LLaVA-1.5's 576, as papers report). Pruning happens in the
prefill only; decode steps attend to the reduced KV cache ("static" pruning, FastV issue #14).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from pumer_plug.config import MethodConfig
from pumer_plug.errors import UserError
from pumer_plug.method import TEXT_SALIENCY, ReductionMethod
from pumer_plug.ops.plan import ReductionPlan
from pumer_plug.ops.reduce import combine_heads, drop_padding, prune_by_score, prune_count
from pumer_plug.registry import METHODS
from pumer_plug.stream import IMAGE, TokenStream

#: the budgets decoder-VLM papers report, image tokens kept of LLaVA-1.5's 576
KEEP_BUDGETS = (192, 128, 64)


@dataclass(frozen=True)
class KeepConfig(MethodConfig):
    """Where a keep-top-k method prunes image tokens and how many it keeps.

    Attributes:
        layer: K, the first decoder layer that runs on the kept tokens (>= 1); the scores come
            from layer K - 1.
        prune_ratio: R, the fraction of a sample's image tokens pruned, in [0, 1).
        keep_tokens: image tokens kept per sample; overrides ``prune_ratio`` when set (>= 1).

    Raises:
        UserError: a field of the wrong type or range; the message names the field.
    """

    layer: int = 2
    prune_ratio: float = 0.5
    keep_tokens: int | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.register_preset("default", "FastV Sec. 4: K = 2, R = 50%")
        for n in KEEP_BUDGETS:
            cls.register_preset(f"keep{n}", f"keep {n} of LLaVA-1.5's 576 image tokens", keep_tokens=n)

    def __post_init__(self) -> None:
        name = type(self).__name__
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise UserError(f"{name}.layer must be an int >= 1 (K, the first layer on the kept tokens), got {self.layer!r}")
        self._ratios("prune_ratio")
        k = self.keep_tokens
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise UserError(f"{name}.keep_tokens must be None or an int >= 1, got {k!r}")

    @property
    def is_identity(self) -> bool:
        return self.keep_tokens is None and self.prune_ratio == 0

    def summary(self) -> str:
        budget = f"keep={self.keep_tokens}" if self.keep_tokens is not None else f"R={self.prune_ratio:g}"
        return f"K={self.layer} {budget}"

    def num_pruned(self, num_image: int) -> int:
        """Image tokens pruned from a sample with ``num_image`` of them."""
        if self.keep_tokens is not None:
            return num_image - self.keep_tokens
        return prune_count(num_image, self.prune_ratio, 0)


class KeepTopK(ReductionMethod):
    """Base of the keep-top-k decoder methods: one reduction between layers K - 1 and K.

    Subclasses implement :meth:`scores`.
    """

    placements = frozenset({"decoder-layer"})

    def reduction_layers(self, num_layers: int) -> tuple[int, ...]:
        point = self.config.layer - 1  # the adapter's reduction point i lies between layers i and i + 1
        if point >= num_layers:
            raise ValueError(
                f"{type(self.config).__name__}.layer K={self.config.layer} is beyond the decoder: the kept tokens "
                f"must enter a layer in 1..{num_layers}"
            )
        return (point,)

    @classmethod
    def suggest_config(cls, trial: Any, num_layers: int, placement: str = "encoder-layer") -> KeepConfig:
        """K (the first layer on the kept tokens) and the prune ratio R."""
        return cls.config_class(layer=trial.suggest_int("layer", 1, num_layers),
                                prune_ratio=trial.suggest_float("prune_ratio", 0.0, 0.95, step=0.05))

    def check_image_tokens(self, num_image: int) -> None:
        k = self.config.keep_tokens
        if k is not None and k > num_image:
            raise ValueError(
                f"{type(self.config).__name__}.keep_tokens={k} exceeds the {num_image} image tokens of a sample"
            )

    def scores(self, layer: int, stream: TokenStream):
        raise NotImplementedError

    def reduce(self, layer: int, stream: TokenStream) -> ReductionPlan:
        plans = []
        for view in stream.views():
            if view.segment.modality != IMAGE:
                plans.append(drop_padding(view.mask, view.lengths))
                continue
            pruned = tuple(self.config.num_pruned(n) for n in view.lengths)
            if not any(pruned):
                plans.append(drop_padding(view.mask, view.lengths))
                continue
            scores = self.scores(layer, stream)
            plans.append(prune_by_score(scores, view.mask, view.protected, pruned, view.lengths))
        return stream.reduce_segments(plans)


@dataclass(frozen=True)
class FastVConfig(KeepConfig):
    """FastV: K = 2, R = 50% by default (FastV Sec. 4). See :class:`KeepConfig`."""

    LABEL: ClassVar[str] = "FastV"


@METHODS.register("fastv")
class FastV(KeepTopK):
    """Keeps the image tokens the last prompt token attends to most (FastV Sec. 4).

    Raises:
        RuntimeError: at a forward where the adapter did not capture the attention scores.
    """

    name = "fastv"
    display_name = "FastV"
    config_class = FastVConfig
    requires = frozenset({TEXT_SALIENCY})
    saliency_queries = "last"

    def scores(self, layer: int, stream: TokenStream):
        if stream.saliency is None:
            raise RuntimeError(f"FastV: the last prompt token's attention was not captured at layer {layer}")
        return combine_heads(stream.saliency, "sum")  # (B, H, V) -> (B, V): the last prompt token's attention, summed over heads
