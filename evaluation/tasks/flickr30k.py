"""Flickr30k image-text retrieval on the Karpathy split (``dataset_flickr30k.json``).

Layout::

    <data-dir>/dataset_flickr30k.json         {"images": [{"filename", "split", "imgid", "sentences": [{"raw"}]}]}
    <data-dir>/flickr30k_images/1000092795.jpg  (flickr30k-images/ also found)

``karpathy/dataset_flickr30k.json`` (ViLT's layout) is also found. The test split has 1000 images
and 5000 captions (5 per image).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .data_files import DataError, ImageSource, load_json, safe_join
from .snli_ve import find_image_folder

FLICKR30K_LAYOUT = (
    "<data-dir>/dataset_flickr30k.json (Karpathy split: images[].filename, split, sentences[].raw), "
    "images <data-dir>/flickr30k_images/{filename}"
)


@dataclass(frozen=True)
class RetrievalSplit:
    """A retrieval gallery: images, captions, and which image each caption describes.

    Attributes:
        image_ids: each image's id (its file name).
        images: each image's file (or bytes, arrow tables), same order.
        texts: every caption, grouped by image in the file's order.
        text_image: for each caption, the index of its image in ``images``.
    """

    image_ids: tuple[str, ...]
    images: Sequence[ImageSource]
    texts: tuple[str, ...]
    text_image: tuple[int, ...]

    def subset(self, image_indices: Sequence[int]) -> RetrievalSplit:
        """The gallery of the given images (e.g. a seeded ``--limit`` subset) with their captions only."""
        position = {old: new for new, old in enumerate(image_indices)}
        kept = [(t, position[i]) for t, i in zip(self.texts, self.text_image) if i in position]
        return RetrievalSplit(
            image_ids=tuple(self.image_ids[i] for i in image_indices),
            images=tuple(self.images[i] for i in image_indices),
            texts=tuple(t for t, _ in kept),
            text_image=tuple(i for _, i in kept),
        )


def read_flickr30k(data_dir: Path | str, split: str = "test") -> RetrievalSplit:
    """Reads a Karpathy split (``train``, ``val``, ``test``) of Flickr30k.

    Raises:
        DataError: the JSON or image folder is missing (naming the layout), an image entry lacks a
            field or has no caption, or the split has no images.
    """
    data_dir = Path(data_dir)
    path = data_dir / "dataset_flickr30k.json"
    if not path.is_file() and (data_dir / "karpathy" / path.name).is_file():
        path = data_dir / "karpathy" / path.name
    entries = load_json(path, FLICKR30K_LAYOUT).get("images")
    if not isinstance(entries, list):
        raise DataError(f"{path} has no 'images' list; expected the Karpathy split JSON")
    image_dir = find_image_folder(data_dir, FLICKR30K_LAYOUT)
    image_ids, images, texts, text_image = [], [], [], []
    for entry in entries:
        if entry.get("split") != split:
            continue
        if "filename" not in entry or not entry.get("sentences") or any("raw" not in c for c in entry["sentences"]):
            raise DataError(f"{path}: image {entry.get('imgid', entry.get('filename', '?'))} has no filename or raw captions")
        images.append(safe_join(image_dir, entry["filename"]))
        image_ids.append(entry["filename"])
        for sentence in entry["sentences"]:
            texts.append(sentence["raw"])
            text_image.append(len(images) - 1)
    if not images:
        raise DataError(f"{path} has no images in split {split!r}")
    return RetrievalSplit(tuple(image_ids), tuple(images), tuple(texts), tuple(text_image))
