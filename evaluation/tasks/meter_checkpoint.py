"""An official METER checkpoint as ``--model``: the METER port with the interface the tasks use.

METER (Dou et al., CVPR 2022) releases Lightning ``.ckpt`` files, not Hugging Face directories. A
METER model folder for ``--model`` holds (``--model`` may name the folder or the checkpoint in it):

- the checkpoint: one ``*.ckpt``, ``*.safetensors``, ``*.pt`` or ``*.bin`` (read with
  ``weights_only=True`` / safetensors, :func:`~pumer_plug.models.meter.load_meter_checkpoint`);
- ``meter_config.json``: ``{"task": "vqa" | "nlvr2" | "snli" | "itm", "config": {MeterConfig fields
  that differ from the base model, e.g. "image_size": 576}, "labels": [...]}``; ``labels`` is the
  answer table (VQA: METER's 3129 answers in head order; SNLI-VE: its 3 label names in head order;
  NLVR2 and ITM have fixed labels and need none);
- the text tokenizer METER used (``roberta-base``'s ``tokenizer.json`` or ``vocab.json`` +
  ``merges.txt``; any folder ``AutoTokenizer.from_pretrained`` reads offline).

Images are preprocessed as METER's CLIP transform: bicubic resize of the shorter side to the
config's ``image_size``, centre crop, CLIP mean/std normalisation.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from pumer_plug.errors import UserError
from pumer_plug.models.meter import MeterConfig, MeterModel, MeterOutput, load_meter_checkpoint

CONFIG_FILE = "meter_config.json"
CHECKPOINT_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".bin")
#: METER head -> the task head kinds (``user_model.TASK_HEADS`` keys) it fits
HEAD_KINDS = {"vqa": ("vqa",), "nlvr2": ("nlvr2",), "snli": ("classification",), "itm": ("retrieval",)}
FIXED_LABELS = {"nlvr2": ("False", "True"), "itm": ("no match", "match")}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LAYOUT = (f"a METER model folder: one checkpoint ({', '.join(CHECKPOINT_SUFFIXES)}), {CONFIG_FILE} "
          '({"task": ..., "config": {...}, "labels": [...]}) and its tokenizer files (docs/reproduce.md)')


@dataclasses.dataclass
class MeterTaskConfig(MeterConfig):
    """``MeterConfig`` plus the label names of the head, as transformers configs carry them."""

    id2label: dict[int, str] = dataclasses.field(default_factory=dict)
    label2id: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def max_position_embeddings(self) -> int:
        """The longest text the tasks tokenize (METER's ``max_text_len``)."""
        return self.max_text_len


class MeterForTask(MeterModel):
    """A :class:`MeterModel` that answers as the tasks call models: ``model(**inputs).logits``.

    Shapes:
        input_ids (B, T), attention_mask (B, T), pixel_values (B, 3, H, W) (NLVR2: (B, 2, 3, H, W))
        -> ``MeterOutput`` with logits (B, K); for ``itm`` the retrieval score ``rank_output`` (B, 1).
    """

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, **_: Any) -> MeterOutput:
        # token_type_ids (a BERT tokenizer's): METER's text encoder has one token type, so they are all 0
        out = super().forward(input_ids, attention_mask, pixel_values, return_features=True)
        if self.task == "itm":
            out.logits = out.rank_scores.unsqueeze(-1)  # (B, 1): METER ranks the gallery by rank_output
        return out


class MeterImageProcessor:
    """METER's CLIP transform: ``images`` (PIL) -> ``{"pixel_values": (B, 3, S, S)}`` float32."""

    def __init__(self, image_size: int) -> None:
        from torchvision import transforms

        self.transform = transforms.Compose([
            transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(image_size), transforms.ToTensor(), transforms.Normalize(CLIP_MEAN, CLIP_STD)])

    def __call__(self, images: list, return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.stack([self.transform(image.convert("RGB")) for image in images])}


@dataclasses.dataclass
class MeterProcessor:
    """The tokenizer and image processor of a METER model folder (the ``processor`` the tasks use)."""

    tokenizer: Any
    image_processor: MeterImageProcessor


def is_meter_model(model: str | None) -> bool:
    """Whether ``--model`` names a METER checkpoint file or a folder holding ``meter_config.json``."""
    if not model:
        return False
    path = Path(model).expanduser()
    return path.suffix in CHECKPOINT_SUFFIXES or (path.is_dir() and (path / CONFIG_FILE).is_file())


def load_meter_model(model: str, head: str) -> tuple[MeterForTask, MeterProcessor, str]:
    """Loads a METER model folder (see the module docstring) for a task with head kind ``head``.

    Returns:
        the model (eval mode, CPU), its processor and a description ("METER (vqa head)").

    Raises:
        UserError: a missing checkpoint, config or tokenizer (naming the file and the layout), a head
            that does not fit ``head`` (naming the heads that do), labels that do not match the head,
            or a checkpoint whose tensors do not fit the config.
    """
    path = Path(model).expanduser()
    folder = path.parent if path.suffix in CHECKPOINT_SUFFIXES else path
    checkpoint = path if path.suffix in CHECKPOINT_SUFFIXES else _single_checkpoint(folder)
    if not checkpoint.is_file():
        raise UserError(f"--model {model}: no such checkpoint file; expected {LAYOUT}")
    spec = _read_spec(folder / CONFIG_FILE)
    task = spec.get("task")
    if task not in HEAD_KINDS:
        raise UserError(f"{folder / CONFIG_FILE}: \"task\" must be one of {', '.join(HEAD_KINDS)}, got {task!r}")
    if head not in HEAD_KINDS[task]:
        fits = [t for t, kinds in HEAD_KINDS.items() if head in kinds]
        raise UserError(f"--model {model} is a METER {task} model, whose head does not fit this task; METER heads that "
                        f"fit: {', '.join(fits) or 'none'}")
    try:
        sizes = MeterConfig(**spec.get("config", {}))
    except TypeError as err:
        raise UserError(f"{folder / CONFIG_FILE}: \"config\" holds a field MeterConfig does not take ({err})") from None
    labels = _labels(spec, task, sizes, folder / CONFIG_FILE)
    config = MeterTaskConfig(**dataclasses.asdict(sizes), id2label=dict(enumerate(labels)),
                             label2id={name: i for i, name in enumerate(labels)})
    meter = MeterForTask(config, task=task)
    try:
        load_meter_checkpoint(meter, checkpoint)
    except ValueError as err:
        raise UserError(f"--model {model}: {str(err).splitlines()[0]}") from None
    return meter.eval(), MeterProcessor(_tokenizer(folder), MeterImageProcessor(config.image_size)), f"METER ({task} head)"


def _single_checkpoint(folder: Path) -> Path:
    found = sorted(p for p in folder.iterdir() if p.suffix in CHECKPOINT_SUFFIXES) if folder.is_dir() else []
    if len(found) != 1:
        raise UserError(f"--model {folder}: {len(found)} checkpoint files there; name one, or keep exactly one in {LAYOUT}")
    return found[0]


def _read_spec(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise UserError(f"{file}: missing; expected {LAYOUT}")
    try:
        spec = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{file}: not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}") from None
    if not isinstance(spec, dict):
        raise UserError(f"{file}: expected a JSON object {{\"task\": ..., \"config\": {{...}}, \"labels\": [...]}}")
    return spec


def _labels(spec: dict[str, Any], task: str, sizes: MeterConfig, file: Path) -> list[str]:
    """The head's label names in head order (``labels`` of the file, or the fixed ones of NLVR2/ITM)."""
    if task in FIXED_LABELS:
        return list(FIXED_LABELS[task])
    labels = spec.get("labels")
    if isinstance(labels, dict):
        labels = [labels[k] for k in sorted(labels, key=int)]
    size = sizes.vqav2_label_size if task == "vqa" else 3
    if not isinstance(labels, list) or len(labels) != size or not all(isinstance(x, str) for x in labels):
        raise UserError(f"{file}: \"labels\" must list the head's {size} answer/label names in head order "
                        f"(METER's answer table for vqa), got {type(labels).__name__}"
                        f"{'' if not isinstance(labels, list) else f' of {len(labels)}'}")
    return labels


def _tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as err:
        raise UserError(f"{folder}: no tokenizer files that AutoTokenizer reads offline (METER uses roberta-base's "
                        f"tokenizer.json or vocab.json + merges.txt): {str(err).splitlines()[0]}") from None
