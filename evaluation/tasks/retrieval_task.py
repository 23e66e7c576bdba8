"""Task ``flickr30k``: image-text retrieval recall@1/5/10 with the user's image-text matching model.

Data: the Karpathy split JSON (:mod:`.flickr30k`) or ViLT's ``f30k_caption_karpathy_<split>.arrow``.
As in the paper (ViLT/METER's evaluation), the model's ITM score ranks the *full* gallery: every
image is scored against every caption of the split (1000 images x 5000 captions on the test split),
so a full pass is I x T forward passes. ``--limit N`` takes a seeded subset of N images with their
captions (stated in the output; recall on a smaller gallery is higher, not comparable to the paper).
Headline metric: text retrieval recall@1 (``tr_r1``, image -> caption, PuMer Table 1 "TR"); image
retrieval (``ir_r1``, caption -> image, "IR") and recall@5/10 are in the results' notes.

Quick runs (``--rerank-top-k K --first-stage-scores FILE``): a first stage ranks the gallery (FILE is a
``flickr30k_<split>_scores.json`` this task wrote, e.g. the dense model's full-gallery run with the same
``--split``/``--limit``, or the same rows from any other scorer such as CLIP), and the model scores only
the union of every image's top K captions and every caption's top K images; the pairs left out rank
last. Every method re-ranks the same candidates, so methods compare on equal terms, but the recall is
bounded by the first stage's and is marked as not comparable to the paper.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from pumer_plug.errors import UserError

from .retrieval_metric import DEFAULT_KS

from .arrow_tables import read_f30k_arrow
from .base import Predictions
from .data_files import DataError
from .flickr30k import RetrievalSplit, read_flickr30k
from .predictions import RunOutputs
from .retrieval_metric import retrieval_recall
from .subset import seeded_subset
from .vl_tasks import DataTask, ExampleDataset, Part


# TASKS entry "flickr30k" (declared in pumer_plug/catalog.py)
class Flickr30kRetrievalTask(DataTask):
    """Flickr30k retrieval on the user's ITM model (``ViltForImageAndTextRetrieval``); default split ``test``."""

    name = "flickr30k"
    adapter = "vilt"
    head = "retrieval"
    metric = "tr_r1"
    unit = "images"
    default_split = "test"
    default_configs: dict[str, Any] = {}  # no ViLT retrieval preset: each method's default
    meter_preset = "meter-retrieval"
    accepted_options = DataTask.accepted_options | {"rerank_top_k", "first_stage_scores"}

    def __init__(self, options=None) -> None:
        super().__init__(options)
        k, first_stage = self.options.rerank_top_k, self.options.first_stage_scores
        if (k is None) != (first_stage is None):
            raise UserError("--rerank-top-k and --first-stage-scores go together: the first stage's scores rank the "
                            "candidates the model re-ranks")
        if k is not None and k < max(DEFAULT_KS):
            raise UserError(f"--rerank-top-k must be at least {max(DEFAULT_KS)} (recall@{max(DEFAULT_KS)} needs that many "
                            f"scored candidates per query), got {k}")
        if first_stage is not None and not Path(first_stage).is_file():
            raise UserError(f"--first-stage-scores {first_stage}: no such file")
        self._galleries: dict[int, RetrievalSplit] = {}

    def gallery(self, split: str) -> RetrievalSplit:
        if (self.data_dir / f"f30k_caption_karpathy_{split}.arrow").is_file():
            return read_f30k_arrow(self.data_dir, split)
        return read_flickr30k(self.data_dir, split)

    def batches(self, split: str, batch_size: int, num_examples: int | None = None):
        data_split = self._data_split(split)
        full = self.gallery(data_split)
        limit = self.options.limit if split == "test" else num_examples
        limit = None if limit is not None and split != "test" and limit >= len(full.images) else limit
        subset = seeded_subset(len(full.images), limit, unit="images")
        gallery = full.subset(subset.indices)
        if split == "test" and self.options.rerank_top_k is not None:
            pairs = rerank_candidates(self._first_stage(gallery, data_split), self.options.rerank_top_k)
        else:
            pairs = [(i, t) for i in range(len(gallery.images)) for t in range(len(gallery.texts))]  # image-major
        offset = self._parts[-1].offset + len(self._parts[-1].examples) if self._parts else 0
        self._parts.append(Part(data_split, pairs, subset, offset))
        self._galleries[offset] = gallery
        inputs = [((gallery.images[i],), gallery.texts[t], f"image {gallery.image_ids[i]}") for i, t in pairs]
        dataset = ExampleDataset(inputs, list(range(offset, offset + len(pairs))), self.options.skip_bad_images)
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=self.options.workers or 0,
                          collate_fn=self._collate())

    def decode(self, logits: torch.Tensor) -> list[float]:
        return logits[:, -1].tolist()  # ITM score: ViLT (B, 1); BridgeTower (B, 2), the "match" class

    def metrics(self, predictions: Predictions) -> dict[str, float]:
        part, examples, outputs = self.evaluated(predictions)
        if len(outputs) != len(part.examples):
            raise DataError(f"retrieval needs every image-caption pair scored; {len(part.examples) - len(outputs)} "
                            "pairs had a corrupt image (remove it from the split instead of --skip-bad-images)")
        gallery = self._galleries[part.offset]
        scores = torch.full((len(gallery.images), len(gallery.texts)), -torch.inf)  # (I, T); pairs not scored rank last
        for position, score in outputs.items():
            i, t = part.examples[position]
            scores[i, t] = score
        result = retrieval_recall(scores, gallery.text_image).as_dict()
        size = f"{len(gallery.images)} images x {len(gallery.texts)} captions"
        reranked = self.options.rerank_top_k is not None and part.split == self._data_split("test")
        self.notes.update(recall={k: round(v, 6) for k, v in result.items()},
                          gallery=(f"re-ranked: the model scored {len(part.examples)} of the gallery's {size} pairs, the top "
                                   f"{self.options.rerank_top_k} per query of {self.options.first_stage_scores}; NOT comparable "
                                   "to the paper (full gallery)") if reranked else f"full gallery of {size}")
        return result

    def _first_stage(self, gallery: RetrievalSplit, split: str) -> torch.Tensor:
        """The first stage's (I, T) scores of ``gallery`` from ``--first-stage-scores``.

        Raises:
            UserError: the file is not a list of {"image", "caption_index", "score"} rows, or it does not
                score every image-caption pair of this gallery (another split or ``--limit``).
        """
        import json

        path = self.options.first_stage_scores
        try:
            rows = json.loads(Path(path).read_text())
            entries = {(str(r["image"]), int(r["caption_index"])): float(r["score"]) for r in rows}
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise UserError(f"--first-stage-scores {path}: expected the JSON list of {{\"image\", \"caption_index\", "
                            f"\"score\"}} rows that flickr30k writes ({type(err).__name__}: {err})") from None
        scores = torch.empty(len(gallery.images), len(gallery.texts))  # (I, T)
        for i, image in enumerate(gallery.image_ids):
            for t in range(len(gallery.texts)):
                score = entries.get((str(image), t))
                if score is None:
                    raise UserError(f"--first-stage-scores {path} has no score for image {image}, caption {t} of the "
                                    f"{split} gallery ({len(gallery.images)} images x {len(gallery.texts)} captions); "
                                    "write it with the same --split and --limit")
                scores[i, t] = score
        return scores

    def write_official(self, outputs: RunOutputs, method: str, part: Part, predictions: Predictions) -> Path:
        import json

        gallery = self._galleries[part.offset]
        rows = [{"image": gallery.image_ids[part.examples[gid - part.offset][0]],
                 "caption_index": part.examples[gid - part.offset][1], "score": score}
                for gid, score in zip(predictions.targets, predictions.outputs)]
        return outputs.write_text(method, f"flickr30k_{part.split}_scores.json", json.dumps(rows))


def rerank_candidates(first_stage: torch.Tensor, top_k: int) -> list[tuple[int, int]]:
    """The (image, caption) pairs a re-ranking pass scores: each image's top ``top_k`` captions and each
    caption's top ``top_k`` images under the first stage, without repeats, image-major.

    Shapes:
        first_stage (I, T) -> at most I * T pairs
    """
    num_images, num_texts = first_stage.shape
    chosen = torch.zeros(num_images, num_texts, dtype=torch.bool)  # (I, T)
    chosen.scatter_(1, first_stage.topk(min(top_k, num_texts), dim=1).indices, True)  # image -> its top captions
    chosen.scatter_(0, first_stage.topk(min(top_k, num_images), dim=0).indices, True)  # caption -> its top images
    return [(int(i), int(t)) for i, t in chosen.nonzero().tolist()]
