"""Shared machinery of the benchmark tasks on the user's model and data (VQAv2, NLVR2, SNLI-VE, custom).

A :class:`DataTask` reads a split from ``--data-dir``, draws the ``--limit`` subset, decodes and
preprocesses images through the model's processor inside a ``torch.utils.data.DataLoader``
(``--workers``), and keeps, for every example it hands out, a run-wide id: evaluation batches carry
those ids as targets, so :meth:`DataTask.metrics` and :meth:`DataTask.write_predictions` score and
write the examples that were actually evaluated (skipped images are counted, never hidden).
Subclasses say how to read a split (:meth:`DataTask.read_split`), what an example feeds the model
(:meth:`DataTask.example_inputs`), its training target, and how answers are scored and written.
"""
from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from pumer_plug.errors import UserError

from .base import Batch, Predictions, Task, TaskOptions, load_config
from .data_files import DataError, ImageDecoder, ImageSource
from .predictions import RunOutputs, write_run_info
from .subset import Subset, seeded_subset
from .user_model import UserModel, load_user_model, max_text_length

#: TaskOptions fields every data task takes
DATA_TASK_OPTIONS = frozenset({"model", "data_dir", "split", "limit", "workers", "skip_bad_images",
                               "trust_remote_code", "overwrite"})

#: notes that hold one method's scores: written to its run_info.json, not shared by the run's rows
PER_METHOD_NOTES = frozenset({"vqa_accuracy_per_answer_type", "accuracy_per_class", "recall"})


@dataclasses.dataclass(frozen=True)
class Part:
    """The examples of one ``batches()`` call: split name, examples, the subset drawn, first run-wide id."""

    split: str
    examples: Sequence[Any]
    subset: Subset
    offset: int


class ExampleDataset(Dataset):
    """Items ``(images or None, text, target)``: images decoded here (in a DataLoader worker).

    ``None`` stands for an example with a corrupt image skipped under ``--skip-bad-images``.
    """

    def __init__(self, inputs: Sequence[tuple[tuple[ImageSource, ...], str, str]], targets: Sequence[Any], skip_bad_images: bool):
        self.inputs, self.targets = inputs, targets
        self.decoder = ImageDecoder(skip_bad_images)
        self._last: tuple[Any, Any] = (None, None)  # (source, image): retrieval pairs repeat an image back to back

    def __len__(self) -> int:
        return len(self.inputs)

    def _decode(self, source: ImageSource, name: str):
        if self._last[0] is not None and self._last[0] == source:
            return self._last[1]
        image = self.decoder(source, name if not isinstance(source, Path) else None)
        self._last = (source, image)
        return image

    def __getitem__(self, index: int):
        sources, text, name = self.inputs[index]
        images = [self._decode(source, name) for source in sources]
        if any(image is None for image in images):
            return None, text, self.targets[index]
        return images, text, self.targets[index]


class Collate:
    """Batches dataset items through the processor: ``(inputs, targets)``; skipped examples are dropped.

    Shapes:
        one image per example: pixel_values (B, 3, H, W); two (NLVR2): (B, 2, 3, H, W)
    """

    def __init__(self, processor: Any, max_length: int, num_images: int = 1):
        self.processor, self.max_length, self.num_images = processor, max_length, num_images

    def __call__(self, items: list) -> Batch:
        kept = [item for item in items if item[0] is not None]
        if not kept:
            raise DataError(f"every image of a batch of {len(items)} examples is corrupt (--skip-bad-images drops "
                            "corrupt examples from a batch, not whole batches); check the image files or change --batch-size")
        texts = [text for _, text, _ in kept]
        encoded = dict(self.processor.tokenizer(texts, padding="longest", truncation=True, max_length=self.max_length,
                                                return_tensors="pt"))  # (B, T), T = longest text in the batch
        images = [image for item in kept for image in item[0]]  # (B * num_images) images, example-major
        pixels = dict(self.processor.image_processor(images, return_tensors="pt"))
        if self.num_images > 1:
            pixels = {k: v.reshape(len(kept), self.num_images, *v.shape[1:]) for k, v in pixels.items()}  # (B, I, ...)
        targets = [target for _, _, target in kept]
        stacked = torch.stack(targets) if isinstance(targets[0], torch.Tensor) else torch.tensor(targets)
        return {**encoded, **pixels}, stacked


class LazyBatches(Sequence):
    """Training batches collated on access (one epoch, in the given order)."""

    def __init__(self, dataset: ExampleDataset, collate: Collate, order: Sequence[int], batch_size: int):
        self.dataset, self.collate, self.order, self.batch_size = dataset, collate, list(order), batch_size

    def __len__(self) -> int:
        return len(self.order) // self.batch_size

    def __getitem__(self, index: int) -> Batch:
        if not 0 <= index < len(self):
            raise IndexError(index)
        chunk = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        return self.collate([self.dataset[i] for i in chunk])


class DataTask(Task):
    """Base of the tasks on the user's model (``--model``) and data (``--data-dir``); see the module docstring."""

    accepted_options = DATA_TASK_OPTIONS
    writes_predictions = True
    #: the model head kind (key of ``user_model.TASK_HEADS``)
    head: ClassVar[str] = "vqa"
    #: the data split evaluated by default ("test" of the harness); ``--split`` overrides it
    default_split: ClassVar[str] = "val"
    #: the data split used for early stopping during finetuning
    val_split: ClassVar[str] = "val"
    #: images per example
    num_images: ClassVar[int] = 1
    #: what an example is called in outputs
    unit: ClassVar[str] = "examples"
    default_configs: ClassVar[dict[str, Any]] = {"pumer": "vilt-vqa"}
    #: PuMer's preset for a METER model on this task (PuMer Table 6)
    meter_preset: ClassVar[str | None] = "meter-vqa"

    def __init__(self, options: TaskOptions | None = None) -> None:
        super().__init__(options)
        if not self.options.data_dir:
            raise UserError(f"task {self.name!r} needs --data-dir, the folder holding the data")
        if not Path(self.options.data_dir).expanduser().is_dir():
            raise UserError(f"--data-dir {self.options.data_dir}: no such folder")
        self.data_dir = Path(self.options.data_dir).expanduser()
        self.split = self.options.split or self.default_split
        self._user: UserModel | None = None
        self._parts: list[Part] = []
        self._outputs: RunOutputs | None = None
        self.notes: dict[str, Any] = {}

    # -- model -----------------------------------------------------------------------------------------
    @property
    def user_model(self) -> UserModel:
        """The loaded user model (loaded once; :meth:`load_model` hands out fresh copies)."""
        if self._user is None:
            self._user = load_user_model(self.options.model, self.head, self.options.trust_remote_code)
            self.adapter = self._user.adapter  # the instance's backbone (class default: vilt)
            self.check_model(self._user.model)
        return self._user

    def check_model(self, model: nn.Module) -> None:
        """Raises UserError if the model's labels do not fit the task (default: nothing to check)."""

    def default_config(self, method: str) -> Any:
        """As :meth:`Task.default_config`, with PuMer's METER preset of the task (``meter-vqa``, ...) when
        ``--model`` is a METER model (the ViLT presets name layers a 6-block METER fusion does not have)."""
        if method == "pumer" and self.user_model.adapter == "meter" and self.meter_preset:
            return load_config(method, self.meter_preset)
        return super().default_config(method)

    def load_model(self, device: torch.device) -> nn.Module:
        import copy

        return copy.deepcopy(self.user_model.model).to(device).eval()

    # -- data ------------------------------------------------------------------------------------------
    def read_split(self, split: str) -> Sequence[Any]:
        """The examples of a data split (built lazily). Raises DataError for a missing file."""
        raise NotImplementedError

    def example_inputs(self, example: Any) -> tuple[tuple[ImageSource, ...], str, str]:
        """(image sources, text, name of the example for errors about an image given as bytes)."""
        raise NotImplementedError

    def train_target(self, example: Any) -> Any:
        """The training target of an example (a class id or a tensor); None: not trainable (dropped)."""
        raise UserError(f"task {self.name!r} cannot be trained")

    def _data_split(self, split: str) -> str:
        if split == "test":
            return self.split
        if split == "val":
            return self.val_split
        if split == "train":
            return "train"
        raise UserError(f"task {self.name!r} has no split {split!r}; splits: train, val, test")

    def _collate(self) -> Collate:
        return Collate(self.user_model.processor, max_text_length(self.user_model.model), self.num_images)

    def batches(self, split: str, batch_size: int, num_examples: int | None = None) -> Iterable[Batch]:
        data_split = self._data_split(split)
        records = self.read_split(data_split)
        limit = self.options.limit if split == "test" else num_examples
        limit = None if limit is not None and split != "test" and limit >= len(records) else limit
        subset = seeded_subset(len(records), limit, unit=self.unit)
        examples = subset.take(records)
        offset = self._parts[-1].offset + len(self._parts[-1].examples) if self._parts else 0
        self._parts.append(Part(data_split, examples, subset, offset))
        dataset = ExampleDataset([self.example_inputs(e) for e in examples], list(range(offset, offset + len(examples))),
                                 self.options.skip_bad_images)
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=self.options.workers or 0,
                          collate_fn=self._collate())

    def train_batches(self, batch_size: int, seed: int, num_examples: int) -> Sequence[Batch]:
        records = self.read_split("train")
        examples = seeded_subset(len(records), min(num_examples, len(records)), seed=seed).take(records)
        pairs = [(e, self.train_target(e)) for e in examples]
        pairs = [(e, t) for e, t in pairs if t is not None]
        if not pairs:
            raise DataError(f"no train example of {self.data_dir} has a target the model can produce")
        dataset = ExampleDataset([self.example_inputs(e) for e, _ in pairs], [t for _, t in pairs],
                                 self.options.skip_bad_images)
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
        return LazyBatches(dataset, self._collate(), order, min(batch_size, len(pairs)))

    # -- scoring ---------------------------------------------------------------------------------------
    def decode(self, logits: torch.Tensor) -> list[str]:
        """The model's answers (label names) of a batch of logits (B, K)."""
        labels = self.user_model.model.config.id2label
        return [labels[int(i)] for i in logits.argmax(dim=-1).tolist()]

    def predictions(self, model: nn.Module, batches: Iterable[Batch]) -> Predictions:
        was_training = model.training
        model.eval()
        result = Predictions()
        bar = tqdm(unit=self.unit, desc=f"{self.name} pass", leave=False, disable=None)  # no bar off a terminal
        with torch.inference_mode():
            for inputs, ids in batches:
                if bar.total is None and len(ids):  # the pass's size is known from its first example
                    bar.total = len(self.part_of(Predictions(targets=ids[:1].tolist())).examples)
                result.outputs += self.decode(model(**inputs).logits.float())
                result.targets += ids.tolist()
                bar.update(len(ids))
        bar.close()
        model.train(was_training)
        return result

    def check_outputs(self, folder: Path, names: Sequence[str]) -> None:
        """Raises DataError when a method's folder under ``folder`` already holds files and
        ``--overwrite`` is off (so a re-run stops before its first pass, not after it)."""
        if self.options.overwrite:
            return
        for name in names:
            taken = sorted(p.name for p in (Path(folder) / name).glob("*")) if (Path(folder) / name).is_dir() else []
            if taken:
                raise DataError(f"{Path(folder) / name} already holds {', '.join(taken)} of an earlier run; choose "
                                "another output folder or pass --overwrite to replace them; nothing was evaluated")

    def reference_text(self, example: Any) -> str:
        """The reference answer of an example as ``show`` prints it; default: "?" (none)."""
        return "?"

    def answer_text(self, output: Any) -> str:
        """Answers read as themselves; a target (the example's position in the run) as its reference."""
        if isinstance(output, int):
            part = self.part_of(Predictions(targets=[output]))
            return self.reference_text(part.examples[output - part.offset])
        return str(output)

    def held_out_test_split(self) -> bool:
        return self.split != self.val_split

    def save_model_assets(self, folder: Path) -> None:
        """The processor (tokenizer + image processor) beside the finetuned weights, when it can save itself."""
        processor = self.user_model.processor
        if hasattr(processor, "save_pretrained"):
            processor.save_pretrained(folder)

    def part_of(self, predictions: Predictions) -> Part:
        """The ``batches()`` call the predictions came from. Raises DataError when there are none."""
        if not predictions.targets:
            raise DataError("no example was evaluated (every image skipped?)")
        index = bisect.bisect_right([p.offset for p in self._parts], predictions.targets[0]) - 1
        return self._parts[index]

    def evaluated(self, predictions: Predictions) -> tuple[Part, dict[int, Any], dict[int, str]]:
        """(part, position -> example, position -> output) of the evaluated examples; records the skip count."""
        part = self.part_of(predictions)
        outputs = {gid - part.offset: out for gid, out in zip(predictions.targets, predictions.outputs)}
        examples = {i: part.examples[i] for i in outputs}
        skipped = len(part.examples) - len(outputs)
        self.notes = {"examples": part.subset.describe() + (f", {len(outputs)} scored" if skipped else ""),
                      "split": part.split, "skipped_examples": skipped}  # examples with a corrupt image (--skip-bad-images)
        return part, examples, outputs

    def run_notes(self) -> dict[str, Any]:
        """The notes shared by every method of a run (per-method scores go to each method's ``run_info.json``)."""
        return {k: v for k, v in self.notes.items() if k not in PER_METHOD_NOTES}

    def outputs(self, root: Path) -> RunOutputs:
        if self._outputs is None or self._outputs.root != root:
            self._outputs = RunOutputs(root, overwrite=self.options.overwrite)
        return self._outputs

    def write_official(self, outputs: RunOutputs, method: str, part: Part, predictions: Predictions) -> Path:
        """Writes the predictions in the task's official format; returns the path."""
        raise NotImplementedError

    def write_predictions(self, predictions: Predictions, path: Path) -> Path:
        """Writes ``<folder>/<method>/<official file>`` and ``run_info.json`` (``path`` is ``<folder>/predictions-<method>.jsonl``)."""
        method = path.stem.removeprefix("predictions-")
        outputs = self.outputs(path.parent)
        part = self.part_of(predictions)
        written = self.write_official(outputs, method, part, predictions)
        write_run_info(outputs, method, {**self.notes, "model": str(self.options.model), "data_dir": str(self.data_dir)})
        return written
