"""DynamicViT (Rao et al., NeurIPS 2021): learned prediction modules that prune image tokens.

At reduction layer ``s = 1, 2, ...`` a ``PredictorLG`` (DynamicViT ``models/dyvit.py``) scores
keep vs. drop from the image tokens' features (``stream.hidden``). Only image segments are
pruned; protected tokens (image CLS, prefix tokens) are always kept, text is never touched.

- eval: hard top-k with real removal; a row keeps ``floor(rho^s * V0)`` image tokens, ``V0`` its
  real unprotected image tokens at the start (DynamicViT ``int(init_n * token_ratio[s])``).
- train: no removal; Gumbel-softmax hard decisions with a straight-through gradient, times the
  previous stage's. ``softmax_with_policy`` is proportional attention (ToMe Sec. 3) with token
  sizes equal to the policy, ``exp(a_j) p_j / sum_k exp(a_k) p_k``: the method writes
  ``eps + (1 - eps) p`` into ``stream.size`` and reports proportional attention, so every adapter
  adds ``log(size)`` to later attention logits and the gradient reaches the predictors. Unlike
  ``softmax_with_policy``, a dropped query does not keep its own key (only dropped tokens'
  outputs change; nothing reads them), and dropped keys weigh ``eps`` instead of ``eps / N``.

A reduction layer ``L`` reduces after its attention, so dropped tokens leave every attention
from ``L + 1`` on, as DynamicViT's ``pruning_loc = L + 1`` and PuMer's ``prune_layers = L``.
The predictors belong to the method, never to the backbone: ``attach()`` builds them at the width
the adapter hands over (``adapter.hidden_size``), so ``modules()`` exists right after ``apply()``;
``state_dict()``/``load_state_dict()`` save and load them. Training loops add
``method.training_losses()`` (the keep-ratio loss weighted by ``keep_ratio_weight``) and
:func:`distillation_loss` (DynamicViT ``losses.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from pumer_plug.baselines.dynamicvit_config import DynamicViTConfig, keep_count  # noqa: F401 (re-exported)
from pumer_plug.errors import UserError
from pumer_plug.method import HIDDEN, ReductionMethod, suggest_layers
from pumer_plug.ops.counts import add_counts, fraction_count, min_counts, offset_counts
from pumer_plug.ops.plan import ReductionPlan
from pumer_plug.ops.reduce import prune_by_score
from pumer_plug.stream import IMAGE, MIXED, SegmentView, TokenStream

#: weight of a dropped token in train-mode attention (DynamicViT ``softmax_with_policy`` eps)
POLICY_EPS = 1e-6


# -- pure tensor functions ---------------------------------------------------------------------
PREDICTOR_SEED = 0  # the predictors' initialisation (reproducible untrained runs)


class PredictorLG(nn.Module):
    """Keep/drop log-probabilities from local and policy-pooled global features (DynamicViT ``PredictorLG``).

    Shapes:
        x (B, n, C), policy (B, n, 1) -> (B, n, 2), log-probabilities of [keep, drop]
    """

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, embed_dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(embed_dim, embed_dim // 2), nn.GELU(),
            nn.Linear(embed_dim // 2, embed_dim // 4), nn.GELU(),
            nn.Linear(embed_dim // 4, 2), nn.LogSoftmax(dim=-1),
        )
        for m in self.modules():  # VisionTransformerDiffPruning._init_weights
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        x = self.in_conv(x)  # (B, n, C)
        B, n, C = x.shape
        local_x = x[:, :, : C // 2]  # (B, n, C/2)
        weight = policy.to(x.dtype)
        total = weight.sum(dim=1, keepdim=True).clamp_min(POLICY_EPS)  # (B, 1, 1); no 0/0 for an empty row
        global_x = (x[:, :, C // 2 :] * weight).sum(dim=1, keepdim=True) / total  # (B, 1, C - C/2)
        return self.out_conv(torch.cat([local_x, global_x.expand(B, n, -1)], dim=-1))


def gumbel_keep(log_probs: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Hard keep decisions with a straight-through gradient (``F.gumbel_softmax(hard=True)[..., 0:1]``).

    Sampled in float32 with clamped uniforms, so low-precision inputs never give ``log(0)``.

    Shapes:
        log_probs (B, n, 2) -> (B, n, 1) float32, values 0 or 1
    """
    logits = log_probs.float()
    u = torch.rand_like(logits).clamp(1e-10, 1.0 - 1e-7)
    soft = ((logits - torch.log(-torch.log(u))) / tau).softmax(dim=-1)  # (B, n, 2)
    hard = F.one_hot(soft.argmax(dim=-1), 2).to(soft.dtype)
    return (hard - soft.detach() + soft)[..., 0:1]


def policy_sizes(policy: torch.Tensor, eps: float = POLICY_EPS) -> torch.Tensor:
    """Token sizes that make proportional attention DynamicViT's masked attention: ``eps + (1 - eps) p``.

    Shapes:
        policy (B, n, 1) in [0, 1] -> (B, n, 1) float32 in [eps, 1]
    """
    return eps + (1.0 - eps) * policy.float()


# -- losses a training loop calls --------------------------------------------------------------
@dataclass(frozen=True)
class KeepDecision:
    """One stage's train-mode decisions over one image segment.

    Attributes:
        layer: the reduction layer.
        keep: (B, n) float, cumulative hard decisions with straight-through gradients.
        valid: (B, n) bool, the real unprotected image tokens the ratio is counted over.
        target: rho^s.
    """

    layer: int
    keep: torch.Tensor
    valid: torch.Tensor
    target: float


def keep_ratio_loss(method: "DynamicViT") -> torch.Tensor:
    """Mean over stages of the batch-mean squared error between each row's kept fraction and rho^s.

    DynamicViT ``DistillDiffPruningLoss_dynamic``: ``sum_s ((keep.mean(1) - ratio_s) ** 2).mean() / S``;
    the training script weights it by ``ratio_weight = 2``.

    Raises:
        RuntimeError: the last forward ran no stage in train mode.
    """
    if not method.decisions:
        raise RuntimeError("keep_ratio_loss: the last forward recorded no train-mode keep decisions (call model.train())")
    losses = []
    for d in method.decisions:
        valid = d.valid.to(d.keep.dtype)
        fraction = (d.keep * valid).sum(dim=1) / valid.sum(dim=1).clamp_min(1.0)  # (B,)
        losses.append(((fraction - d.target) ** 2).mean())
    return torch.stack(losses).mean()


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of the softened logits, times tau^2; DynamicViT's ``cls_kl_loss`` at tau = 1.

    Shapes:
        student_logits (B, K), teacher_logits (B, K) -> scalar
    """
    student = F.log_softmax(student_logits.float() / tau, dim=-1)
    teacher = F.log_softmax(teacher_logits.detach().float() / tau, dim=-1)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * tau**2


def token_distillation_loss(student_tokens: torch.Tensor, teacher_tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """MSE between student and teacher tokens over the kept ones (DynamicViT ``mse_token``).

    Shapes:
        student_tokens (B, n, C), teacher_tokens (B, n, C), keep (B, n) -> scalar; 0 when nothing is kept
    """
    chosen = keep.reshape(-1) > 0.5
    if not chosen.any():
        return student_tokens.new_zeros(())
    C = student_tokens.shape[-1]
    diff = student_tokens.reshape(-1, C)[chosen].float() - teacher_tokens.detach().reshape(-1, C)[chosen].float()
    return diff.pow(2).mean()


# -- the method --------------------------------------------------------------------------------
@dataclass
class DynamicViTForwardState:
    """DynamicViT's per-forward scratch.

    Attributes:
        decisions: the train-mode :class:`KeepDecision` of every stage so far.
        start: segment -> real unprotected image tokens per row at the first stage (V0).
        policy: segment -> (B, n, 1) cumulative train-mode decisions.
    """

    decisions: list[KeepDecision] = field(default_factory=list)
    start: dict[tuple[int, int], tuple[int, ...]] = field(default_factory=dict)
    policy: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)


# METHODS entry "dynamicvit" (declared in pumer_plug/catalog.py)
class DynamicViT(ReductionMethod):
    """Learned image-token pruning (DynamicViT Sec. 3) behind the plug-in interface.

    Needs the token features at each reduction layer in ``stream.hidden`` (B, N, C).
    Train vs. eval follows the plugged model's ``training`` flag at each forward.

    Raises:
        RuntimeError: at a forward where the adapter did not provide the hidden states, or the
            predictors sit on another device than the tokens.
        ValueError: at ``apply``, ``embed_dim`` differs from the width the adapter hands over.

    Example:
        >>> handle = pumer_plug.apply(model, method="dynamicvit", config=DynamicViTConfig.preset("vilt"))
        >>> optimizer = torch.optim.AdamW([*model.parameters(), *handle.method.modules().parameters()])
        >>> model.train(); logits = model(**batch).logits
        >>> loss = task_loss + sum(handle.method.training_losses().values()) + 0.5 * distillation_loss(logits, teacher_logits)
        >>> torch.save(handle.method.state_dict(), "predictors.pt")
    """

    name = "dynamicvit"
    display_name = "DynamicViT"
    config_class = DynamicViTConfig
    requires = frozenset({HIDDEN})

    def __init__(self, config: DynamicViTConfig) -> None:
        super().__init__(config)
        self._predictors: nn.ModuleDict | None = None
        if config.embed_dim is not None:
            self._build(config.embed_dim)

    @classmethod
    def suggest_config(cls, trial: Any, num_layers: int, placement: str = "encoder-layer") -> DynamicViTConfig:
        """Pruning layers (stages) and the keep ratio rho per stage."""
        return DynamicViTConfig(reduction_layers=suggest_layers(trial, num_layers),
                                keep_ratio=trial.suggest_float("keep_ratio", 0.3, 0.95, step=0.05))

    # -- lifecycle ------------------------------------------------------------------------------
    def proportional_attention(self) -> bool:
        return True  # train mode: sizes = keep policy; eval sets no size, so adapters add no bias

    def attach(self, handle: Any) -> None:
        """Builds the predictors at the adapter's token width, on the model's device and dtype."""
        width = handle.adapter.hidden_size
        if self._predictors is None:
            self._build(width)
        elif self.embed_dim != width:
            raise UserError(f"DynamicViTConfig.embed_dim is {self.embed_dim}, but the {handle.adapter.name} adapter "
                             f"hands over tokens {width} wide")
        first = next(handle.model.parameters(), None)
        if first is not None:
            self._predictors.to(device=first.device, dtype=first.dtype)

    def new_forward_state(self) -> DynamicViTForwardState:
        return DynamicViTForwardState()

    def on_forward_start(self, state: Any) -> None:
        super().on_forward_start(state)
        if self._predictors is not None:
            self._predictors.train(state.training)

    @property
    def decisions(self) -> list[KeepDecision]:
        """The train-mode :class:`KeepDecision` of every stage of the current (or last) forward."""
        return self.scratch.decisions

    def modules(self) -> nn.ModuleDict | None:
        """The predictors, one per reduction layer (keys ``str(layer)``); built by ``attach()``."""
        return self._predictors

    def training_losses(self) -> dict[str, torch.Tensor]:
        """``{"keep_ratio": keep_ratio_weight * keep_ratio_loss}`` after a train-mode forward, else empty."""
        if not self.decisions:
            return {}
        return {"keep_ratio": self.config.keep_ratio_weight * keep_ratio_loss(self)}

    @property
    def embed_dim(self) -> int | None:
        """The predictors' width (None before they are built)."""
        return None if self._predictors is None else self._predictors[str(self.config.reduction_layers[0])].in_conv[1].in_features

    def _build(self, embed_dim: int) -> None:
        """Initialises the predictors from a fixed seed (``PREDICTOR_SEED``) without touching the global
        random state, so untrained (plug-and-play) DynamicViT gives the same result on every run."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(PREDICTOR_SEED)
            self._predictors = nn.ModuleDict({str(i): PredictorLG(embed_dim) for i in self.config.reduction_layers})
        self._predictors.train(False)

    # -- saved state -------------------------------------------------------------------------------
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Loads predictors saved from :meth:`state_dict` (building them if the method has none yet).

        Raises:
            UserError: the state holds predictors for other reduction layers or of another width.
        """
        layers = tuple(sorted({int(key.split(".", 1)[0]) for key in state}))
        if layers != self.config.reduction_layers:
            raise UserError(f"the state holds DynamicViT predictors for reduction_layers {layers}, "
                            f"but the config has {self.config.reduction_layers}")
        width = state[f"{layers[0]}.in_conv.1.weight"].shape[1]
        if self._predictors is None:
            self._build(width)
        if self.embed_dim != width:
            raise UserError(f"the state holds DynamicViT predictors of width {width}, but this method's are "
                            f"{self.embed_dim} wide")
        super().load_state_dict(state)

    # -- reduction ------------------------------------------------------------------------------
    def reduce(self, layer: int, stream: TokenStream) -> ReductionPlan:
        plans, sizes, start, changed = [], [], 0, False
        for index, view in enumerate(stream.views()):
            n = view.segment.length
            if view.segment.modality == MIXED:
                raise RuntimeError(f"DynamicViT cannot prune a mixed segment at layer {layer}")
            plan, size = ReductionPlan.identity(n), None
            if view.segment.modality == IMAGE and not self.config.is_identity:
                plan, size = self._prune(layer, stream, (id(stream), index), start, view)
            plans.append(plan)
            sizes.append(size)
            changed |= size is not None
            start += n
        if changed:  # train mode: the policy enters later attention as log(size), shapes are kept
            full = stream.sizes()
            pieces, start = [], 0
            for view, size in zip(stream.views(), sizes):
                stop = start + view.segment.length
                pieces.append(full[:, start:stop] if size is None else size)
                start = stop
            stream.size = torch.cat(pieces, dim=1)  # (B, N, 1)
            stream.bias_cache = None
        return stream.reduce_segments(plans)

    def _prune(self, layer: int, stream: TokenStream, key: tuple[int, int], start: int, view: SegmentView):
        if stream.hidden is None:
            raise RuntimeError(f"DynamicViT: the adapter did not provide the hidden states (stream.hidden) at reduction layer {layer}")
        x = stream.hidden[:, start : start + view.segment.length]  # (B, n, C)
        predictor = self._predictor(layer, x)
        x = x.to(next(predictor.parameters()).dtype)
        candidates = view.mask & ~view.protected  # (B, n) real, prunable
        p = view.segment.num_protected
        scratch = self.scratch
        v0 = scratch.start.setdefault(key, offset_counts(view.lengths, -p))
        ratio = self.config.stage_keep_ratio(layer)
        if self.training:
            prev = scratch.policy.get(key)
            prev = candidates.float().unsqueeze(-1) if prev is None else prev  # (B, n, 1)
            keep = self._decide(predictor(x, prev), prev)
            scratch.policy[key] = keep
            scratch.decisions.append(KeepDecision(layer, keep[..., 0], candidates, ratio))
            size = torch.where(candidates.unsqueeze(-1), policy_sizes(keep), torch.ones_like(keep))
            return ReductionPlan.identity(view.segment.length), size
        with torch.no_grad():
            scores = predictor(x, candidates.unsqueeze(-1))[..., 0]  # (B, n) keep log-probability
        unprotected = offset_counts(view.lengths, -p)
        kept = min_counts(unprotected, fraction_count(v0, ratio))  # DynamicViT int(init_n * token_ratio[s])
        pruned = add_counts(unprotected, kept, sign=-1)
        return prune_by_score(scores, view.mask, view.protected, pruned, view.lengths), None

    def _decide(self, log_probs: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """Train-mode keep decisions (B, n, 1): Gumbel hard samples times the previous ones (DynamicViT ``forward``)."""
        return gumbel_keep(log_probs, self.config.tau) * prev

    def _predictor(self, layer: int, x: torch.Tensor) -> PredictorLG:
        if self._predictors is None:
            raise RuntimeError("DynamicViT has no predictors: apply() it to a model or set DynamicViTConfig.embed_dim")
        predictor = self._predictors[str(layer)]
        weight = predictor.in_conv[1].weight
        if weight.shape[1] != x.shape[-1]:
            raise UserError(f"DynamicViTConfig.embed_dim is {weight.shape[1]}, but the tokens at layer {layer} are {x.shape[-1]} wide")
        if weight.device != x.device:
            raise RuntimeError(f"DynamicViT predictors are on {weight.device} but the tokens on {x.device}; "
                               "move them with handle.method.modules().to(device)")
        return predictor
