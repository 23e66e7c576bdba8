"""The ``pumer-plug`` command line: argument types, options and one parser per command.

:func:`build_parser` takes the command functions (``pumer_plug.cli``) so that each subcommand
calls its own; argument errors are one line (the usage block stays behind ``--help``).
"""
from __future__ import annotations

import argparse
from typing import Any, Callable

import torch

Command = Callable[[argparse.Namespace], int]

DTYPE_CHOICES = ("float32", "float16", "bfloat16")


def _number(kind: type, low: float, strict: bool, expected: str):
    """An argparse type: ``kind(text)``, finite, above ``low`` (strictly if ``strict``)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not (value > low if strict else value >= low) or value == float("inf"):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = _number(int, 0, True, "a positive integer")
_non_negative_int = _number(int, 0, False, "an integer >= 0")
_non_negative_float = _number(float, 0.0, False, "a finite number >= 0")
_positive_float = _number(float, 0.0, True, "a finite number > 0")


def _device(text: str) -> str:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r} (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"device {text!r} requested but CUDA is not available")
    return text


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-threads", type=_positive_int, default=None,
                   help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:N (default: cpu)")


def _add_finetune_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("finetuning (PuMer Sec. 4.3 / App. A.1 scaled to a CPU)")
    g.add_argument("--epochs", type=_positive_int, default=4, help="maximum epochs (paper: 20; default: 4)")
    g.add_argument("--patience", type=_positive_int, default=2, help="early-stopping patience in epochs (paper: 5; default: 2)")
    g.add_argument("--train-batch-size", type=_positive_int, default=32, help="training examples per step and process (default: 32)")
    g.add_argument("--steps-per-epoch", type=_positive_int, default=None, help="cap on the steps of an epoch (default: the whole train split)")
    g.add_argument("--num-train-examples", type=_positive_int, default=2048, help="train examples per epoch (default: 2048)")
    g.add_argument("--num-val-examples", type=_positive_int, default=500, help="val examples for early stopping (default: 500)")
    g.add_argument("--lr", type=_positive_float, default=1e-4, help="AdamW learning rate (default: 1e-4, as PuMer)")
    g.add_argument("--predictor-lr", type=_positive_float, default=1e-3, help="DynamicViT predictors' learning rate (default: 1e-3)")
    g.add_argument("--no-distill", action="store_true", help="no knowledge distillation from the dense model")
    g.add_argument("--distill-weight", type=_non_negative_float, default=1.0, help="weight of the KL loss on logits (default: 1)")
    g.add_argument("--temperature", type=_positive_float, default=1.0, help="distillation temperature (default: 1)")
    g.add_argument("--hidden-distill-weight", type=_non_negative_float, default=0.0,
                   help="weight of the MSE on the first final hidden token, the text [CLS] in ViLT (default: 0, off)")
    g.add_argument("--seed", type=_non_negative_int, default=0, help="seed of initialisation, data order and sampling (default: 0)")
    g.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no", help="accelerate mixed precision (default: no)")


def _compare_parser(sub: Any, run: Command) -> None:
    p = sub.add_parser("compare", help="dense model vs. reduction methods on a task (accuracy, throughput, memory, FLOPs)",
                       description="Evaluate the dense model and each method on the task's test split; print a table and write results.jsonl/results.md.")
    p.add_argument("--task", default="builtin", help="registered task (pumer-plug list; default: builtin, the digits VQA task trained here)")
    p.add_argument("--methods", default="dense,pumer", help="comma-separated methods from the registry (default: dense,pumer)")
    p.add_argument("--config", action="append", metavar="[METHOD=]PRESET_OR_FILE",
                   help="method config: a preset name or a JSON/YAML file; repeatable; default: the task's preset per method")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="evaluation batch size (default: 64)")
    p.add_argument("--find-batch-size", action="store_true",
                   help="CUDA only: time at the largest batch the dense model fits (instead of --batch-size)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32", help="model and input dtype (default: float32)")
    p.add_argument("--save-predictions", action="store_true",
                   help="write each variant's per-example predictions into the output folder")
    p.add_argument("--rounds", type=_positive_int, default=5, help="timed rounds per variant; the median is reported (default: 5)")
    p.add_argument("--timing-batches", type=_positive_int, default=4, help="test batches per timed round (default: 4)")
    p.add_argument("--output", default="results/compare",
                   help="output folder (default: results/compare); results.jsonl is appended to, results.md rewritten")
    p.add_argument("--cache-dir", default=None, help="where the built-in model is cached (default: $PUMER_PLUG_CACHE or ~/.cache/pumer-plug)")
    p.add_argument("--retrain", action="store_true", help="retrain the built-in model even if a cached one exists")
    _add_common(p)
    p.set_defaults(func=run)


def _bench_parser(sub: Any, run: Command) -> None:
    p = sub.add_parser("bench", help="speed benchmark on a backbone built from its config (random init)",
                       description="Dense vs. plugged throughput (interleaved), FLOPs ratio and the reducers' time share.")
    p.add_argument("--model", default="vilt-b32", help="benchmark setup (default: vilt-b32)")
    p.add_argument("--method", default="pumer", help="reduction method (default: pumer)")
    p.add_argument("--config", default=None, help="preset name or JSON/YAML file (default: the setup's config)")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="batch size (default: the setup's)")
    p.add_argument("--rounds", type=_positive_int, default=5, help="timed rounds; median reported (default: 5)")
    p.add_argument("--output", default=None, help="append the result as a JSON line to this file")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32", help="model and input dtype (default: float32)")
    _add_common(p)
    p.set_defaults(func=run)


def _train_parser(sub: Any, run: Command) -> None:
    p = sub.add_parser("train", help="(re)train a built-in digits VQA model (--model vilt or llava) and cache it",
                       description="Train the built-in digits-VQA ViLT from scratch (about 6 minutes on 2 CPU cores) and "
                                   "replace the cached model that compare, finetune and sweep use; prints its val "
                                   "accuracy per question type next to the majority-answer and question-only baselines.")
    p.add_argument("--model", choices=("vilt", "llava"), default="vilt",
                   help="vilt: the built-in ViLT (default); llava: the built-in decoder VLM of task builtin-llava")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="seed of initialisation and training data (default: 0)")
    p.add_argument("--cache-dir", default=None, help="cache folder (default: $PUMER_PLUG_CACHE or ~/.cache/pumer-plug)")
    p.add_argument("--num-threads", type=_positive_int, default=None,
                   help="CPU threads for torch (default: torch's choice); training runs on the CPU")
    p.set_defaults(func=run)


def _finetune_parser(sub: Any, run: Command) -> None:
    p = sub.add_parser("finetune", help="finetune a model with a method attached (distillation, early stopping, resumable)",
                       description="Finetune the task's model with a reduction method attached, distilling from the frozen "
                                   "dense model; early stopping on val accuracy; resumable. Several GPUs: "
                                   "accelerate launch -m pumer_plug.cli finetune --device cuda ...")
    p.add_argument("--task", default="builtin", help="task name (default: builtin)")
    p.add_argument("--method", default="pumer", help="reduction method, or none for the dense model (default: pumer)")
    p.add_argument("--config", default=None, metavar="PRESET_OR_FILE", help="method config (default: the task's preset)")
    p.add_argument("--output", default=None, help="output folder (default: results/finetune/METHOD)")
    p.add_argument("--resume", action="store_true", help="continue from the output folder's checkpoint")
    p.add_argument("--checkpoint-every", type=_non_negative_int, default=0, help="also checkpoint every N steps (default: 0, epoch ends only)")
    p.add_argument("--cache-dir", default=None, help="where the built-in model is cached")
    _add_finetune_options(p)
    _add_common(p)
    p.set_defaults(func=run)


def _sweep_parser(sub: Any, run: Command) -> None:
    p = sub.add_parser("sweep", help="grid of methods x knobs: accuracy, throughput increase, memory, FLOPs per point",
                       description="Measure every point of a grid against the dense model (once per run) and append JSON "
                                   "lines; re-running skips finished points. Presets: figure5, table3, table4 "
                                   "(the paper's studies scaled to the built-in 6-layer model). Grid file schema: "
                                   "see pumer_plug.evaluation.studies.sweep.")
    p.add_argument("--grid", required=True, metavar="PRESET_OR_FILE", help="figure5, table3, table4, or a YAML/JSON grid file")
    p.add_argument("--task", default="builtin", help="task name (default: builtin)")
    p.add_argument("--output", default=None, help="output folder (default: results/sweep/GRID, GRID-finetune with --finetune)")
    p.add_argument("--finetune", action="store_true", help="finetune every point (with distillation) before measuring")
    p.add_argument("--num-test-examples", type=_positive_int, default=None, help="test split size (default: the task's)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="evaluation batch size (default: 64)")
    p.add_argument("--rounds", type=_positive_int, default=3, help="timed rounds per point; the median is reported (default: 3)")
    p.add_argument("--timing-batches", type=_positive_int, default=2, help="test batches per timed round (default: 2)")
    p.add_argument("--no-plot", action="store_true", help="do not write the figure and tables at the end")
    p.add_argument("--list-points", action="store_true", help="print the grid's points and keys, measure nothing")
    p.add_argument("--cache-dir", default=None, help="where the built-in model is cached")
    _add_finetune_options(p)
    _add_common(p)
    p.set_defaults(func=run)


def _plot_parser(sub: Any, run: Command) -> None:
    p = sub.add_parser("plot", help="accuracy vs throughput increase figure and Table 3/4 layouts from sweep results",
                       description="Write tradeoff.png/.svg (Pareto front marked, dense as reference), table3.md and "
                                   "table4.md next to the results (or into --output).")
    p.add_argument("results", help="results.jsonl written by pumer-plug sweep")
    p.add_argument("--output", default=None, help="output folder (default: the results file's folder)")
    p.add_argument("--title", default=None, help="figure title")
    p.add_argument("--annotate", choices=("auto", "yes", "no"), default="auto",
                   help="label every point (auto: when there are at most 12)")
    p.set_defaults(func=run)


def _list_parser(sub: Any, run: Command) -> None:
    p = sub.add_parser("list", help="registered methods, adapters and presets")
    p.set_defaults(func=run)


def build_parser(commands: dict[str, Command]) -> argparse.ArgumentParser:
    """The ``pumer-plug`` parser; ``commands`` maps every subcommand name to the function it runs."""
    parser = _Parser(prog="pumer-plug", description="Plug-in token reduction (PuMer) for vision-language transformers.")
    parser.set_defaults(num_threads=None)  # commands without --num-threads (plot, list)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _compare_parser(sub, commands["compare"])
    _bench_parser(sub, commands["bench"])
    _train_parser(sub, commands["train"])
    _finetune_parser(sub, commands["finetune"])
    _sweep_parser(sub, commands["sweep"])
    _plot_parser(sub, commands["plot"])
    _list_parser(sub, commands["list"])
    return parser


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (the usage block stays behind ``--help``)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


