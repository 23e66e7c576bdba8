"""The task interface: everything ``compare``, ``sweep``, ``finetune`` and the CLI ask of a task.

A task owns a model (``load_model``), batches of ``(inputs, targets)`` per split, and how outputs
are scored. The harness never names a backbone or a dataset: it calls only the methods below.
Subclasses set ``name`` and ``adapter``, implement :meth:`Task.load_model` and :meth:`Task.batches`,
register with ``@TASKS.register("name")`` and are built as ``TASKS.get(name)(TaskOptions(...))``.
Everything else has a default that fits single-label classification (argmax of the logits,
accuracy, cross-entropy).

For a metric that is not plain accuracy (VQA score, recall@k), override :meth:`Task.predictions`
and :meth:`Task.metrics` and set ``metric``: the key of :meth:`Task.metrics` that tables, sweeps
and early stopping use (a fraction in [0, 1]). For large splits, :meth:`Task.batches` may return a
``torch.utils.data.DataLoader``: batches are iterated, never held, except the few that are timed.

Example:
    >>> @TASKS.register("my-vqa")
    ... class MyVqa(Task):
    ...     name, adapter = "my-vqa", "vilt"
    ...     def load_model(self, device): return ViltForQuestionAnswering.from_pretrained(self.options.model).to(device)
    ...     def batches(self, split, batch_size, num_examples=None): return DataLoader(...)
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from pumer_plug.config import load_method_config
from pumer_plug.errors import UserError

Batch = tuple[dict[str, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TaskOptions:
    """What a user may say about a task on the command line; a task refuses what it cannot use.

    Attributes:
        cache_dir: root of the pumer-plug cache (built-in model); None: the default cache.
        retrain: retrain a model the task trains itself (built-in task) even if cached.
        num_test_examples: size of the test split; None: the task's default (the whole split).
        model: a model path or id the task loads (tasks on the user's own checkpoint).
        data_dir: the folder holding the task's data (tasks on data on disk).
        split: the data split evaluated as the test split (``--split``; None: the task's default).
        limit: evaluate a seeded subset of this many examples (``--limit``; None: the whole split).
        workers: DataLoader worker processes for decoding and preprocessing (``--workers``).
        skip_bad_images: skip and count corrupt images instead of failing (``--skip-bad-images``).
        trust_remote_code: allow a model directory's own code to run (``--trust-remote-code``).
        rerank_top_k: retrieval only: score only each query's top k candidates of a first stage
            (``first_stage_scores``) with the model (quick runs; not comparable to the paper).
        first_stage_scores: retrieval only: the first stage's score file for ``rerank_top_k``.
        overwrite: replace prediction files this run did not create (``--overwrite``).
    """

    cache_dir: str | None = None
    retrain: bool = False
    num_test_examples: int | None = None
    model: str | None = None
    data_dir: str | None = None
    split: str | None = None
    limit: int | None = None
    workers: int | None = None
    skip_bad_images: bool = False
    trust_remote_code: bool = False
    rerank_top_k: int | None = None
    first_stage_scores: str | None = None
    overwrite: bool = False


@dataclass
class Predictions:
    """Per-example outputs of one pass, in batch order.

    Attributes:
        outputs: what the model answered for every example (default: the argmax class id).
        targets: the reference of every example (default: the target class id).
    """

    outputs: list[Any] = field(default_factory=list)
    targets: list[Any] = field(default_factory=list)


class Reiterable:
    """An iterable that calls ``make()`` for every pass (batches built lazily, pass after pass)."""

    def __init__(self, make: Callable[[], Iterator[Batch]]):
        self.make = make

    def __iter__(self) -> Iterator[Batch]:
        return self.make()


def on_device(batches: Iterable[Batch], device: torch.device | str, dtype: torch.dtype | None = None) -> Reiterable:
    """``batches`` moved to ``device`` one batch at a time (float inputs cast to ``dtype`` if given), re-iterable."""
    from pumer_plug.evaluation.measure.variants import to_device

    return Reiterable(lambda: ((to_device(x, device, dtype), y.to(device)) for x, y in batches))


def load_config(method: str, spec: Any = None) -> Any:
    """Returns ``method``'s config from user input (preset, file, mapping, config or None).

    Raises:
        UserError: unknown method or preset, unreadable file, or a value the config refuses.
    """
    try:
        return load_method_config(method, spec)
    except ValueError as error:  # a config's validation: the user's value is wrong
        raise UserError(str(error)) from error


def attach_method(model: nn.Module, adapter: str, method: str, config: Any) -> Any:
    """``pumer_plug.apply()`` for user input: its refusals (a config or adapter that does not fit
    the model) become one-line user errors naming the method.

    Raises:
        UserError: ``apply()`` refused the combination.
    """
    from pumer_plug.handle import apply

    try:
        return apply(model, adapter=adapter, config=config, method=method)
    except ValueError as error:
        raise UserError(f"{method} on this model: {error}") from error


def check_methods_fit(model: nn.Module, adapter: str, methods: Iterable[tuple[str, Any]],
                      image_tokens: int | None = None) -> None:
    """Attaches and removes every ``(method, config)`` once, so that a config which does not fit the
    model (e.g. a reduction layer beyond its depth) fails before any evaluation starts.

    Args:
        image_tokens: image tokens per example of the task (``Task.image_tokens``), when known: a
            budget that does not fit them (e.g. FastV ``keep_tokens`` above them) is refused here
            too, not at the first forward.

    Raises:
        UserError: the first ``(method, config)`` that ``apply()`` or the method's
            ``check_image_tokens`` refuses, naming the method and config.
    """
    for method, config in methods:
        try:
            handle = attach_method(model, adapter, method, config)
            try:
                if image_tokens is not None:
                    handle.method.check_image_tokens(image_tokens)
            except ValueError as error:
                raise UserError(f"{method} on this task: {error}") from error
            finally:
                handle.remove()
        except UserError as error:
            raise UserError(f"{error} (config: {config.describe()}); nothing was evaluated") from error


class Task:
    """Base class of evaluation tasks (see the module docstring for what to override).

    Args:
        options: the user's options; :meth:`check_options` refuses those the task cannot use.
    """

    #: name recorded in results (e.g. "builtin-digits-vqa")
    name: ClassVar[str] = ""
    #: registered adapter of the task's model (e.g. "vilt")
    adapter: ClassVar[str] = ""
    #: key of :meth:`metrics` reported as "accuracy" (a fraction in [0, 1])
    metric: ClassVar[str] = "accuracy"
    #: method name -> config spec (preset name or mapping) scaled to the task's model
    default_configs: ClassVar[dict[str, Any]] = {}
    #: a decoder VLM that generates its answers: ``compare`` times prefill and decode steps
    #: (time to first token, decode tokens/s, KV cache) instead of one forward
    generates: ClassVar[bool] = False
    #: TaskOptions fields this task uses besides the defaults (others raise in check_options)
    accepted_options: ClassVar[frozenset[str]] = frozenset()
    #: whether ``compare`` always writes predictions (official result files), not only with --save-predictions
    writes_predictions: ClassVar[bool] = False
    #: how ``sweep``/``plot`` name the speed-up of the timed forward: one whole forward, or for a
    #: generative task its prefill (the prompt with the vision tower, no decode step)
    speedup_label: ClassVar[str] = "throughput increase"

    def __init__(self, options: TaskOptions | None = None) -> None:
        self.options = options or TaskOptions()
        self.check_options()

    def check_options(self) -> None:
        """Raises UserError naming every option set that this task does not use."""
        unused = sorted(k for k, v in vars(self.options).items()
                        if v not in (None, False) and k not in self.accepted_options)
        if unused:
            hint = ("; its test split is sized by --num-test-examples" if "limit" in unused
                    and "num_test_examples" in self.accepted_options else "")
            raise UserError(f"task {self.name!r} does not take {', '.join('--' + k.replace('_', '-') for k in unused)}{hint}")

    # -- required ------------------------------------------------------------------------------------
    def load_model(self, device: torch.device) -> nn.Module:
        """Returns a fresh model in eval mode on ``device`` (finetuning changes it in place)."""
        raise NotImplementedError

    def batches(self, split: str, batch_size: int, num_examples: int | None = None) -> Iterable[Batch]:
        """Returns re-iterable ``(inputs, targets)`` batches of ``split`` ("train", "val", "test").

        ``inputs`` are the model's keyword arguments on the CPU; ``num_examples`` caps the split
        (None: the task's default size). A list, or a DataLoader for large splits.

        Raises:
            UserError: an unknown split.
        """
        raise NotImplementedError

    # -- optional ------------------------------------------------------------------------------------
    def predictions(self, model: nn.Module, batches: Iterable[Batch]) -> Predictions:
        """Runs ``model`` over ``batches`` (eval mode, inference mode); default: argmax class ids."""
        was_training = model.training
        model.eval()
        result = Predictions()
        with torch.inference_mode():
            for inputs, targets in batches:
                result.outputs += model(**inputs).logits.argmax(dim=-1).tolist()
                result.targets += targets.tolist()
        model.train(was_training)
        return result

    def metrics(self, predictions: Predictions) -> dict[str, float]:
        """Scores of ``predictions``, ``metric`` among them; default: ``{"accuracy": ...}``."""
        hits = sum(o == t for o, t in zip(predictions.outputs, predictions.targets))
        return {"accuracy": hits / max(len(predictions.targets), 1)}

    def accuracy(self, model: nn.Module, batches: Iterable[Batch]) -> float:
        """The headline score (``metrics(...)[metric]``) of ``model`` on ``batches``."""
        return self.metrics(self.predictions(model, batches))[self.metric]

    def write_predictions(self, predictions: Predictions, path: Path) -> Path:
        """Writes ``predictions`` to ``path`` (default: JSON lines of index, output, target)."""
        lines = (json.dumps({"index": i, "output": o, "target": t})
                 for i, (o, t) in enumerate(zip(predictions.outputs, predictions.targets)))
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        return path

    def check_outputs(self, folder: Path, names: Sequence[str]) -> None:
        """Refuses, before any pass, outputs :meth:`write_predictions` would refuse after one; default: none."""

    def held_out_test_split(self) -> bool:
        """Whether the test split differs from the val split (``tune`` and ``finetune`` choose on val);
        default: yes."""
        return True

    def save_model_assets(self, folder: Path) -> None:
        """Writes what loading the task's model from ``folder`` needs besides the weights (``finetune``
        calls it beside ``save_pretrained``, so ``--model FOLDER`` loads the finetuned model); default: nothing."""

    def run_notes(self) -> dict[str, Any]:
        """What the last scored pass evaluated (subset, skipped images, label coverage), recorded with results; default: none."""
        return {}

    def reference_accuracies(self, split: str = "test") -> dict[str, float]:
        """Scores of trivial predictors on ``split`` to print beside the results (default: none)."""
        return {}

    def image_tokens(self, inputs: dict[str, torch.Tensor]) -> int | None:
        """Image tokens the dense model computes on for the first example of ``inputs`` (``sweep``
        and ``plot``: accuracy vs kept image tokens); default None (not known)."""
        return None

    def token_texts(self, input_ids: Sequence[int]) -> list[str]:
        """The text of every input token id (``pumer-plug show``); default: the ids themselves."""
        return [str(i) for i in input_ids]

    def answer_text(self, output: Any) -> str:
        """How an output of :meth:`predictions` reads (``pumer-plug show``); default: ``str(output)``."""
        return str(output)

    def encode_example(self, image: Any, question: str) -> dict[str, torch.Tensor]:
        """Model inputs (a one-example batch) of a new PIL ``image`` and ``question`` (``pumer-plug show --image``).

        Raises:
            UserError: the task cannot encode new examples (the default).
        """
        raise UserError(f"task {self.name!r} cannot encode a new image and question; draw a split example with --index")

    def default_config(self, method: str) -> Any:
        """The config of ``method`` for this task's model (``default_configs``, else the method's default)."""
        return load_config(method, self.default_configs.get(method))

    def train_batches(self, batch_size: int, seed: int, num_examples: int) -> Sequence[Batch]:
        """One epoch of train batches, shuffled by ``seed`` (called once per epoch).

        Raises:
            UserError: the task cannot be trained (the default).
        """
        raise UserError(f"task {self.name!r} cannot be trained: it does not implement "
                        "Task.train_batches(batch_size, seed, num_examples)")

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The task loss of one batch; default: cross-entropy over class ids.

        Shapes:
            logits (B, K), targets (B,) -> scalar
        """
        return F.cross_entropy(logits.float(), targets)


def classification_accuracy(model: nn.Module, batches: Iterable[Batch]) -> float:
    """Fraction of examples whose argmax logit equals the target id (eval mode, inference mode)."""
    return Task().accuracy(model, batches)
