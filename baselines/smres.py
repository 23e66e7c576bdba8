"""Smaller resolution (SmRes): the input-downsampling baseline of PuMer Table 2.

Fewer pixels give fewer patches, so every layer computes on fewer image tokens. A forward
pre-hook on the plugged model resizes the image input (bilinear, antialiased) and any pixel mask
(nearest) before the model sees them. Which argument holds the image is read from the signature
of the model's ``forward``: ``pixel_values`` (B, C, H, W) or (B, n, C, H, W), ``x``, ``image``,
``images``; ``pixel_mask`` (B, H, W) or (B, n, H, W).

The backbone must then take images of the new size, with position embeddings interpolated to the
new, possibly non-square, patch grid (1 + (H/p)(W/p) positions). That is backbone knowledge, so
SmRes requires the ``image_size`` capability, and ``attach`` asks the adapter
(``adapter.accept_image_size(handle)``) to make the backbone take it; adapters without it are
refused at ``apply()``:

- ViLT (transformers): ``visual_embed`` interpolates the position embedding to each image's
  (h, w) patch grid: nothing to do, non-square included.
- BridgeTower: every module whose ``forward`` takes ``interpolate_pos_encoding`` gets it set to
  True (bicubic to (H/p, W/p)), non-square included.
- timm ViT: timm's ``dynamic_img_size`` path; open_clip ``VisionTransformer`` and METER's CLIP
  tower: the adapter resamples the fixed-length position table to the input's patch grid.

The resizer is a pre-hook on the adapter's ``image_module``: the module whose ``forward`` takes
the images (the model itself, or e.g. a CLIP model's ``visual`` tower, so ``encode_image`` is
reduced as well as the full forward).

SmRes reduces no token inside the model. It reports reduction layer 0, where it returns identity
plans, so ``handle.token_counts[0]`` holds the (smaller) token counts every layer computes on.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from pumer_plug.baselines.smres_config import DEFAULT_SCALE, SmResConfig  # noqa: F401 (re-exported)
from pumer_plug.method import IMAGE_SIZE, ReductionMethod
from pumer_plug.ops.plan import ReductionPlan
from pumer_plug.stream import TokenStream

#: forward arguments that may hold the image, in the order they are looked for
IMAGE_ARGUMENTS = ("pixel_values", "x", "image", "images")
#: forward arguments that hold a per-pixel mask of the image
PIXEL_MASK_ARGUMENTS = ("pixel_mask",)
def resize_images(images: torch.Tensor, size: tuple[int, int], antialias: bool = True) -> torch.Tensor:
    """Bilinear resize of the last two dims (computed in float32, returned in the input dtype).

    Shapes:
        images (..., C, H, W) -> (..., C, h, w)
    """
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    flat = images.reshape(-1, *images.shape[-3:]).float()  # (B', C, H, W)
    out = F.interpolate(flat, size=size, mode="bilinear", align_corners=False, antialias=antialias)
    return out.to(images.dtype).reshape(*images.shape[:-2], *size)


def resize_pixel_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest resize of a per-pixel mask.

    Shapes:
        mask (..., H, W) -> (..., h, w), same dtype
    """
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    flat = mask.reshape(-1, 1, *mask.shape[-2:]).float()  # (B', 1, H, W)
    out = F.interpolate(flat, size=size, mode="nearest")
    return out.to(mask.dtype).reshape(*mask.shape[:-2], *size)


# METHODS entry "smres" (declared in pumer_plug/catalog.py)
class SmRes(ReductionMethod):
    """Downsamples the input images before the model (PuMer Table 2, "SmRes").

    Raises:
        ValueError: at ``apply``, when the model's ``forward`` has no image argument.
        RuntimeError: at a forward that passes no image tensor (e.g. only ``image_embeds``).
    """

    name = "smres"
    display_name = "SmRes"
    config_class = SmResConfig
    requires = frozenset({IMAGE_SIZE})

    def reduction_layers(self, num_layers: int) -> tuple[int, ...]:
        return (0,)  # identity plans there: the adapter records the token counts of the forward

    @classmethod
    def suggest_config(cls, trial: Any, num_layers: int, placement: str = "encoder-layer") -> SmResConfig:
        """The image side-length scale."""
        return SmResConfig(scale=trial.suggest_float("scale", 0.3, 1.0, step=0.05))

    def reduce(self, layer: int, stream: TokenStream) -> ReductionPlan:
        return stream.reduce_segments([ReductionPlan.identity(s.length) for s in stream.segments])

    def attach(self, handle: Any) -> None:
        module = handle.adapter.image_module
        signature = inspect.signature(module.forward)
        if not any(name in signature.parameters for name in IMAGE_ARGUMENTS):
            raise ValueError(f"smres: {type(module).__name__}.forward{signature} has no image argument "
                             f"(one of {', '.join(IMAGE_ARGUMENTS)})")
        handle.add_forward_pre_hook(module, self._resizer(signature, type(module).__name__), with_kwargs=True)
        handle.adapter.accept_image_size(handle)

    def _resizer(self, signature: inspect.Signature, owner: str):
        config = self.config

        def hook(module: nn.Module, args: tuple, kwargs: dict):
            bound = signature.bind_partial(*args, **kwargs)
            values = bound.arguments
            name = next((n for n in IMAGE_ARGUMENTS if _is_image(values.get(n))), None)
            if name is None:
                raise RuntimeError(f"smres: {owner}.forward got no image tensor to resize "
                                   f"(looked for {', '.join(IMAGE_ARGUMENTS)})")
            images = values[name]  # (B, C, H, W) or (B, n, C, H, W)
            size = config.target_size(*images.shape[-2:])
            values[name] = resize_images(images, size, config.antialias)
            for mask_name in PIXEL_MASK_ARGUMENTS:
                if torch.is_tensor(values.get(mask_name)):
                    values[mask_name] = resize_pixel_mask(values[mask_name], size)
            return bound.args, bound.kwargs

        return hook


def _is_image(value: Any) -> bool:
    return torch.is_tensor(value) and value.is_floating_point() and value.dim() in (4, 5)
