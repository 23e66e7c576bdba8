"""Image-text retrieval recall@k (Flickr30k / COCO, Karpathy split) from a full score matrix.

As ViLT's ``compute_irtr_recall`` (and PuMer) compute it: every image is scored against every
caption; a caption belongs to exactly one image (5 per image in the Karpathy split).

- text -> image (image retrieval, "IR"): for each caption, is its image among the top k images?
- image -> text (text retrieval, "TR"): for each image, is *any* of its captions among the top k?

Ties are broken by position (the lower index ranks first), so results are deterministic; entries
a cheap first stage did not re-rank may be ``-inf`` and rank last.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .data_files import DataError

DEFAULT_KS = (1, 5, 10)


@dataclass(frozen=True)
class RetrievalScore:
    """Recall@k in both directions, fractions in [0, 1].

    Attributes:
        text_to_image: k -> fraction of captions whose image ranks in the top k (IR R@k).
        image_to_text: k -> fraction of images with a caption in the top k (TR R@k).
        num_images: gallery size.
        num_texts: number of captions.
    """

    text_to_image: dict[int, float]
    image_to_text: dict[int, float]
    num_images: int
    num_texts: int

    def as_dict(self) -> dict[str, float]:
        """Flat keys for tables: ``ir_r1``, ``ir_r5``, ..., ``tr_r1``, ..., and ``rsum`` (sum of all, in %)."""
        out = {f"ir_r{k}": v for k, v in self.text_to_image.items()}
        out.update({f"tr_r{k}": v for k, v in self.image_to_text.items()})
        out["rsum"] = 100 * sum(out.values())
        return out


def _positions(scores: torch.Tensor, dim: int) -> torch.Tensor:
    """Rank of every entry along ``dim`` (0 = best): descending score, ties by lower index first.

    Shapes:
        scores (I, T) -> (I, T)
    """
    order = torch.argsort(scores, dim=dim, descending=True, stable=True)  # (I, T) indices along dim
    shape = [1, 1]
    shape[dim] = scores.shape[dim]
    rank = torch.arange(scores.shape[dim]).view(shape).expand_as(order)  # (I, T) position in order
    return torch.empty_like(order).scatter_(dim, order, rank)


def retrieval_recall(
    scores: torch.Tensor, text_image: Sequence[int] | torch.Tensor, ks: Sequence[int] = DEFAULT_KS
) -> RetrievalScore:
    """Recall@k for text->image and image->text retrieval.

    Shapes:
        scores: (num_images, num_texts), higher = better match (ITM logit or similarity).
        text_image: (num_texts,), the index of each caption's image in ``scores``' rows.

    Raises:
        DataError: shapes disagree, a score is NaN, a caption points at no image, or an image has
            no caption.

    Example:
        >>> s = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
        >>> retrieval_recall(s, [0, 1], ks=(1,)).as_dict()["ir_r1"]
        1.0
    """
    scores = torch.as_tensor(scores, dtype=torch.float64).detach().cpu()
    text_image = torch.as_tensor(text_image, dtype=torch.long).cpu()
    if scores.ndim != 2 or text_image.shape != (scores.shape[1],):
        raise DataError(f"scores {tuple(scores.shape)} must be (num_images, num_texts) with one image per text; "
                        f"got {tuple(text_image.shape)} text->image ids")
    if torch.isnan(scores).any():
        raise DataError("the score matrix has NaN entries")
    num_images, num_texts = scores.shape
    if num_texts and (text_image.min() < 0 or text_image.max() >= num_images):
        raise DataError(f"a caption points at an image outside 0..{num_images - 1}")
    captioned = torch.zeros(num_images, dtype=torch.bool)
    captioned[text_image] = True
    if not captioned.all():
        raise DataError(f"image {int((~captioned).nonzero()[0])} has no caption; image->text recall is undefined")

    texts = torch.arange(num_texts)
    image_rank_of_text = _positions(scores, dim=0)[text_image, texts]  # (num_texts,) rank of the true image
    text_ranks = _positions(scores, dim=1)  # (num_images, num_texts) rank of each caption per image
    own = text_ranks[text_image, texts]  # (num_texts,) rank of each caption for its own image
    best_own = torch.full((num_images,), num_texts, dtype=torch.long).scatter_reduce(0, text_image, own, "amin")
    return RetrievalScore(
        text_to_image={k: float((image_rank_of_text < k).double().mean()) for k in ks},
        image_to_text={k: float((best_own < k).double().mean()) for k in ks},
        num_images=num_images,
        num_texts=num_texts,
    )
