"""Tiny benchmark folders in the real, public layouts, for tests (no data is copied: images are drawn).

Each ``write_*`` function writes one split into ``root`` exactly as the public release lays it
out (file names, JSON schema, ViLT/METER arrow columns) and returns ``root``. Contents are
deterministic, so tests can hand-compute metrics. See ``docs/data-formats.md`` for the layouts.

Example::

    root = write_vqav2(tmp_path / "vqav2", split="val", num_questions=6)
    split = read_vqav2(root, "val")  # 6 questions about 3 images, 10 answers each
"""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

#: the answers the VQA fixtures use; a tiny model built with this id2label can produce all of them
VQA_FIXTURE_ANSWERS = ("yes", "no", "2", "3", "red", "blue", "cat", "dog")
#: (question, answer_type, question_type, the 10 annotators' answers) cycled over the questions
VQA_FIXTURE_QUESTIONS = (
    ("Is there a cat?", "yes/no", "is there a", ["yes"] * 10),
    ("How many dogs are there?", "number", "how many", ["2"] * 6 + ["3"] * 3 + ["two"]),
    ("What color is the ball?", "other", "what color is the", ["red"] * 4 + ["blue"] * 4 + ["dark red", "red."]),
    ("What animal is this?", "other", "what animal is this", ["cat"] * 2 + ["dog"] * 8),
    ("Is it sunny?", "yes/no", "is it", ["no"] * 9 + ["yes"]),
    ("How many balls?", "number", "how many", ["3"] * 3 + ["2"] * 7),
)
SNLI_VE_FIXTURE_LABELS = ("entailment", "neutral", "contradiction")


def draw_image(path: Path, index: int, size: tuple[int, int] = (48, 40)) -> Path:
    """Draws a small picture (a colored box on a background, both set by ``index``) into ``path``.

    The format follows the suffix (``.jpg`` JPEG, ``.png`` PNG); folders are created.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    background = ((37 * index) % 256, (91 * index) % 256, (53 * index + 80) % 256)
    image = Image.new("RGB", size, background)
    box = (index % 5 * 4, index % 3 * 4, size[0] // 2 + index % 7 * 2, size[1] // 2 + index % 4 * 3)
    ImageDraw.Draw(image).rectangle(box, fill=(255 - background[0], 255 - background[1], 255 - background[2]))
    image.save(path, format="JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG")
    return path


def image_bytes(index: int, suffix: str = ".jpg") -> bytes:
    """The encoded bytes of :func:`draw_image`'s picture ``index`` (for arrow tables)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return draw_image(Path(tmp) / f"x{suffix}", index).read_bytes()


def write_corrupt_image(path: Path) -> Path:
    """Overwrites ``path`` with bytes that are not an image (a truncated JPEG header)."""
    path.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return path


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


def _write_jsonl(path: Path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def vqav2_image_id(k: int) -> int:
    """The COCO image id of the fixture's ``k``-th image (two questions per image)."""
    return 42 + 1000 * k


def write_vqav2(root: Path, split: str = "val", num_questions: int = 6) -> Path:
    """Writes a VQAv2 split: questions JSON, annotations JSON (train/val) and COCO-named JPEGs.

    Question ``i`` asks :data:`VQA_FIXTURE_QUESTIONS` ``[i % 6]`` about image ``i // 2``; its id is
    ``image_id * 1000 + i % 2`` as VQAv2 numbers them. ``test-dev``/``test`` get no annotations and
    their images go to ``test2015/``.

    Returns:
        ``root``.
    """
    year = "2015" if split.startswith("test") else "2014"
    folder = f"test{year}" if split.startswith("test") else f"{split}{year}"
    subtype = f"{split}{year}"
    questions, annotations = [], []
    for i in range(num_questions):
        image_id = vqav2_image_id(i // 2)
        text, answer_type, question_type, answers = VQA_FIXTURE_QUESTIONS[i % len(VQA_FIXTURE_QUESTIONS)]
        qid = image_id * 1000 + i % 2
        questions.append({"image_id": image_id, "question": text, "question_id": qid})
        annotations.append({
            "question_type": question_type,
            "multiple_choice_answer": max(set(answers), key=answers.count),
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j, a in enumerate(answers)],
            "image_id": image_id,
            "answer_type": answer_type,
            "question_id": qid,
        })
        draw_image(root / folder / f"COCO_{folder}_{image_id:012d}.jpg", i // 2)
    header = {"info": {"description": "pumer-plug test fixture"}, "license": {"name": "none"}, "data_subtype": subtype}
    _write_json(root / f"v2_OpenEnded_mscoco_{subtype}_questions.json",
                {**header, "task_type": "Open-Ended", "data_type": "mscoco", "questions": questions})
    if not split.startswith("test"):
        _write_json(root / f"v2_mscoco_{subtype}_annotations.json", {**header, "annotations": annotations})
    return root


def write_nlvr2(root: Path, split: str = "dev", num_pairs: int = 3) -> Path:
    """Writes an NLVR2 split: ``{split}.json`` lines and the image pairs as NLVR2 names them.

    Pair ``p`` has set id ``100 + p``, two sentences (ids 0 and 1) labeled True then False for even
    pairs and False then True for odd ones. ``dev``/``test1`` images go to ``{split}/``; ``train``
    images to ``images/train/{p % 2}/`` with the ``directory`` field, as the release does.
    """
    records = []
    for p in range(num_pairs):
        stem = f"{split}-{100 + p}-0"
        folder = root / "images" / "train" / str(p % 2) if split == "train" else root / split
        draw_image(folder / f"{stem}-img0.png", 2 * p)
        draw_image(folder / f"{stem}-img1.png", 2 * p + 1)
        for s in range(2):
            record = {
                "identifier": f"{stem}-{s}",
                "sentence": f"The left image has {p + s} dogs.",
                "label": "True" if (p + s) % 2 == 0 else "False",
                "left_url": f"https://example.invalid/{stem}-l.jpg",
                "right_url": f"https://example.invalid/{stem}-r.jpg",
                "synset": "n02084071",
                "query": f"dog{p}",
                "writer": 7,
            }
            if split == "train":
                record["directory"] = p % 2
            records.append(record)
    _write_jsonl(root / f"{split}.json", records)
    return root


def write_snli_ve(root: Path, split: str = "test", num_images: int = 2, hypotheses_per_image: int = 3) -> Path:
    """Writes ``snli_ve_{split}.jsonl`` and Flickr30k JPEGs in ``flickr30k_images/``.

    Hypothesis ``h`` of image ``k`` has label :data:`SNLI_VE_FIXTURE_LABELS` ``[(k + h) % 3]`` and
    pairID ``{image_id}.jpg#{h}r1{e|n|c}`` as SNLI's.
    """
    records = []
    for k in range(num_images):
        image_id = str(1000092795 + k)
        draw_image(root / "flickr30k_images" / f"{image_id}.jpg", k)
        for h in range(hypotheses_per_image):
            label = SNLI_VE_FIXTURE_LABELS[(k + h) % 3]
            records.append({
                "Flickr30K_ID": image_id,
                "sentence1": f"Two people walk a dog number {k}.",
                "sentence2": f"Hypothesis {h} about picture {k}.",
                "gold_label": label,
                "pairID": f"{image_id}.jpg#{h}r1{label[0]}",
                "captionID": f"{image_id}.jpg#{h}",
                "annotator_labels": [label],
            })
    _write_jsonl(root / f"snli_ve_{split}.jsonl", records)
    return root


def write_flickr30k(root: Path, images_per_split: dict[str, int] | None = None, captions_per_image: int = 5) -> Path:
    """Writes ``dataset_flickr30k.json`` (Karpathy schema) and the images in ``flickr30k_images/``.

    Args:
        images_per_split: e.g. ``{"train": 2, "val": 1, "test": 3}`` (the default).
    """
    images_per_split = images_per_split or {"train": 2, "val": 1, "test": 3}
    entries, sentid = [], 0
    for split, count in images_per_split.items():
        for _ in range(count):
            imgid = len(entries)
            filename = f"{2000000000 + imgid}.jpg"
            draw_image(root / "flickr30k_images" / filename, imgid)
            sentences = []
            for c in range(captions_per_image):
                raw = f"Caption {c} of image {imgid}."
                sentences.append({"tokens": raw.lower().rstrip(".").split(), "raw": raw, "imgid": imgid, "sentid": sentid})
                sentid += 1
            entries.append({"sentids": [s["sentid"] for s in sentences], "imgid": imgid, "sentences": sentences,
                            "split": split, "filename": filename})
    _write_json(root / "dataset_flickr30k.json", {"images": entries, "dataset": "flickr30k"})
    return root


def write_custom(root: Path, split: str = "val", kind: str = "vqa", num_examples: int = 4) -> Path:
    """Writes ``{split}.jsonl`` in the custom format and its images under ``images/``.

    ``kind="vqa"``: one image and an ``answers`` list per line; ``"classification"``: two images
    and a ``label`` ("True"/"False") per line.
    """
    records = []
    for i in range(num_examples):
        if kind == "vqa":
            draw_image(root / "images" / f"img{i}.jpg", i)
            records.append({"id": f"q{i}", "image": f"images/img{i}.jpg", "text": f"What color is box {i}?",
                            "answers": ["red", "red", "blue"] if i % 2 == 0 else ["blue"] * 4})
        else:
            paths = [f"images/pair{i}_{side}.png" for side in ("left", "right")]
            for j, rel in enumerate(paths):
                draw_image(root / rel, 2 * i + j)
            records.append({"id": f"p{i}", "images": paths, "text": f"Both boxes are large ({i}).",
                            "label": "True" if i % 2 == 0 else "False"})
    _write_jsonl(root / f"{split}.jsonl", records)
    return root


def _write_arrow(path: Path, columns: dict) -> Path:
    """Writes an arrow IPC *file* as ViLT's scripts do (``pa.RecordBatchFileWriter``)."""
    import pyarrow as pa

    table = pa.table(columns)
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(path), "wb") as sink, pa.RecordBatchFileWriter(sink, table.schema) as writer:
        writer.write_table(table)
    return path


def write_vqav2_arrow(root: Path, split: str = "val", num_images: int = 3) -> Path:
    """Writes ViLT's ``vqav2_{split}.arrow``: one row per image with its questions (two each).

    Answers keep ViLT's scheme: per question the distinct annotator answers in
    :data:`VQA_FIXTURE_ANSWERS` with score 0.3/0.6/0.9/1.0 by count; test splits have empty lists.
    """
    import pyarrow as pa

    label_of = {a: i for i, a in enumerate(VQA_FIXTURE_ANSWERS)}
    score = {1: 0.3, 2: 0.6, 3: 0.9}
    rows = {k: [] for k in ("image", "questions", "answers", "answer_labels", "answer_scores", "image_id", "question_id", "split")}
    for k in range(num_images):
        image_id = vqav2_image_id(k)
        qs, answers, labels, scores, qids = [], [], [], [], []
        for j in range(2):
            text, _, _, raw = VQA_FIXTURE_QUESTIONS[(2 * k + j) % len(VQA_FIXTURE_QUESTIONS)]
            counts = {a: raw.count(a) for a in dict.fromkeys(raw) if a in label_of}
            qs.append(text)
            qids.append(image_id * 1000 + j)
            answers.append(list(counts))
            labels.append([label_of[a] for a in counts])
            scores.append([score.get(c, 1.0) for c in counts.values()])
        test = split.startswith("test")
        for key, value in (("image", image_bytes(k)), ("questions", qs), ("answers", [] if test else answers),
                           ("answer_labels", [] if test else labels), ("answer_scores", [] if test else scores),
                           ("image_id", image_id), ("question_id", qids), ("split", split)):
            rows[key].append(value)
    rows["answers"] = pa.array(rows["answers"], type=pa.list_(pa.list_(pa.string())))
    rows["answer_labels"] = pa.array(rows["answer_labels"], type=pa.list_(pa.list_(pa.int64())))
    rows["answer_scores"] = pa.array(rows["answer_scores"], type=pa.list_(pa.list_(pa.float64())))
    _write_arrow(root / f"vqav2_{split}.arrow", rows)
    return root


def write_nlvr2_arrow(root: Path, split: str = "dev", num_pairs: int = 2) -> Path:
    """Writes ViLT's ``nlvr2_{split}.arrow``: image_0, image_1, questions, answers, identifier per pair."""
    rows = {"image_0": [], "image_1": [], "questions": [], "answers": [], "identifier": []}
    for p in range(num_pairs):
        rows["image_0"].append(image_bytes(2 * p, ".png"))
        rows["image_1"].append(image_bytes(2 * p + 1, ".png"))
        rows["questions"].append([f"The left image has {p + s} dogs." for s in range(2)])
        rows["answers"].append(["True" if (p + s) % 2 == 0 else "False" for s in range(2)])
        rows["identifier"].append(f"{split}-{100 + p}-0")
    _write_arrow(root / f"nlvr2_{split}.arrow", rows)
    return root


def write_snli_arrow(root: Path, split: str = "test", num_images: int = 2) -> Path:
    """Writes METER's ``snli_{split}.arrow``: image, sentences ([premise, hypothesis]), labels (0/1/2)."""
    label_id = {"contradiction": 0, "neutral": 1, "entailment": 2}
    rows = {"image": [], "sentences": [], "labels": []}
    for k in range(num_images):
        rows["image"].append(image_bytes(k))
        rows["sentences"].append([[f"Two people walk a dog number {k}.", f"Hypothesis {h} about picture {k}."] for h in range(3)])
        rows["labels"].append([label_id[SNLI_VE_FIXTURE_LABELS[(k + h) % 3]] for h in range(3)])
    _write_arrow(root / f"snli_{split}.arrow", rows)
    return root


def write_f30k_arrow(root: Path, split: str = "test", num_images: int = 3, captions_per_image: int = 5) -> Path:
    """Writes ViLT's ``f30k_caption_karpathy_{split}.arrow``: image, caption (list), image_id (file name), split."""
    rows = {"image": [], "caption": [], "image_id": [], "split": []}
    for k in range(num_images):
        rows["image"].append(image_bytes(k))
        rows["caption"].append([f"Caption {c} of image {k}." for c in range(captions_per_image)])
        rows["image_id"].append(f"{2000000000 + k}.jpg")
        rows["split"].append(split)
    _write_arrow(root / f"f30k_caption_karpathy_{split}.arrow", rows)
    return root
