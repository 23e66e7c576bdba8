"""The ``pumer-plug`` command line: argument types, options and one parser per command.

Importing this module (and building the parser) imports neither torch nor transformers, so
``pumer-plug --help`` answers at once; the command functions import what they need.

:func:`build_parser` takes the command functions (``pumer_plug.cli``) so that each subcommand
calls its own; argument errors are one line (the usage block stays behind ``--help``).
"""
from __future__ import annotations

import argparse
from typing import Any, Callable

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
    import torch  # here, not at the top: `--help` and `list` must start without torch

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


def _add_data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("your model and data (tasks vqav2, nlvr2, snli-ve, flickr30k, custom; see docs/reproduce.md)")
    g.add_argument("--model", default=None, help="HF model directory (model + processor), an id in the local HF cache, or a METER model folder / .ckpt (docs/reproduce.md)")
    g.add_argument("--data-dir", default=None, help="folder holding the task's data in its official layout or ViLT's arrow tables")
    g.add_argument("--split", default=None, help="data split to evaluate (default: the task's, e.g. val for vqav2)")
    g.add_argument("--limit", type=_positive_int, default=None, help="evaluate a seeded subset of N examples (stated in the output)")
    g.add_argument("--workers", type=_non_negative_int, default=None, help="DataLoader workers decoding images (default: 0)")
    g.add_argument("--skip-bad-images", action="store_true", help="skip and count corrupt images instead of stopping")
    g.add_argument("--trust-remote-code", action="store_true", help="let the model directory's own code run (off by default)")
    g.add_argument("--overwrite", action="store_true", help="replace prediction files this run did not create")
    g.add_argument("--rerank-top-k", type=_positive_int, default=None,
                   help="flickr30k: score only the top K candidates of every query under --first-stage-scores "
                        "(quick runs; marked as not comparable to the paper; K >= 10)")
    g.add_argument("--first-stage-scores", default=None,
                   help="flickr30k: a flickr30k_<split>_scores.json (e.g. the dense model's, from an earlier full-gallery "
                        "run with the same --split/--limit) ranking the candidates for --rerank-top-k")


def _compare_parser(sub: Any, run: Command) -> None:
    p = sub.add_parser("compare", help="dense model vs. reduction methods on a task (accuracy, throughput, memory, FLOPs)",
                       description="Evaluate the dense model and each method on the task's test split; print a table and write results.jsonl/results.md.")
    p.add_argument("--task", default="builtin", help="registered task (pumer-plug list; default: builtin, the digits VQA task whose model ships with the package)")
    p.add_argument("--methods", default="dense,pumer", help="comma-separated methods from the registry (default: dense,pumer)")
    p.add_argument("--config", action="append", metavar="[METHOD=]PRESET_OR_FILE",
                   help="method config: a preset name, a JSON/YAML file (a finetune's method.json too) or inline JSON "
                        "(fields not given take the config class's defaults, not the preset's); repeatable; "
                        "default: the task's preset per method")
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
    p.add_argument("--wide", action="store_true",
                   help="print every column and the full config descriptions (default: a table that fits 120 columns)")
    p.add_argument("--cache-dir", default=None, help="where the built-in model is cached (default: $PUMER_PLUG_CACHE or ~/.cache/pumer-plug)")
    p.add_argument("--retrain", action="store_true", help="retrain the built-in model even if a cached one exists")
    p.add_argument("--num-test-examples", type=_positive_int, default=None,
                   help="built-in tasks: test split size (default: the task's, 1000); user data: --limit")
    _add_data_options(p)
    _add_common(p)
    p.set_defaults(func=run)


def _bench_parser(sub: Any, run: Command) -> None:
    p = sub.add_parser("bench", help="speed benchmark on a backbone built from its config (random init)",
                       description="Dense vs. plugged throughput (interleaved), FLOPs ratio and the reducers' time share.")
    p.add_argument("--model", default="vilt-b32", help="benchmark setup (default: vilt-b32)")
    p.add_argument("--method", default="pumer", help="reduction method (default: pumer)")
    p.add_argument("--config", default=None, help="preset name or JSON/YAML file (default: the setup's config for the method)")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="batch size (default: the setup's)")
    p.add_argument("--rounds", type=_positive_int, default=5, help="timed rounds; median reported (default: 5)")
    p.add_argument("--output", default=None, metavar="FOLDER",
                   help="append the result as a JSON line to FOLDER/bench.jsonl (default: print only)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32", help="model and input dtype (default: float32)")
    p.add_argument("--train-memory", action="store_true",
                   help="also measure peak memory of inference and of one training step, dense and plugged")
    _add_common(p)
    p.set_defaults(func=run)


def _train_parser(sub: Any, run: Command) -> None:
    p = sub.add_parser("train", help="(re)train a built-in digits VQA model (--model vilt or llava) and cache it",
                       description="Train a built-in digits-VQA model (the ViLT, or with --model llava the LLaVA) from scratch (about 8 "
                                   "minutes for the ViLT, 9 for the LLaVA, on 2 idle CPU cores; longer when other jobs share them; "
                                   "one progress bar per curriculum stage) and "
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
    _add_data_options(p)
    _add_common(p)
    p.set_defaults(func=run)


def _sweep_parser(sub: Any, run: Command) -> None:
    p = sub.add_parser("sweep", help="grid of methods x knobs: accuracy, throughput increase, memory, FLOPs per point",
                       description="Measure every point of a grid against the dense model (once per run) and append JSON "
                                   "lines; re-running skips finished points. Presets: figure5, table3, table4 "
                                   "(the paper's studies scaled to the built-in 6-layer model). Grid file format: "
                                   "docs/grids.md, example docs/grids/example.yaml.")
    p.add_argument("--grid", default=None, metavar="PRESET_OR_FILE", help="figure5, table3, table4 (encoder tasks), decoder-budgets (--task builtin-llava), or a YAML/JSON grid file (docs/grids.md)")
    p.add_argument("--tuned", type=_targets, default=None, metavar="X,Y,...",
                   help="instead of --grid: tune each of --tune-methods at these speed-up targets (val) and sweep "
                        "the tuned configs, e.g. 1.2,1.4,1.6,1.8 (Figure 5 from tuned points)")
    p.add_argument("--tune-methods", default=None,
                   help="methods for --tuned (default: every method with a search space that fits the task's model: "
                        "pumer, tome, dynamicvit, smres on the built-in ViLT; pumer, fastv, random, pool on builtin-llava)")
    p.add_argument("--tune-measure", choices=("flops", "throughput"), default="flops", help="target measure for --tuned (default: flops)")
    p.add_argument("--tune-budget", type=_positive_int, default=40, help="trials per method and target for --tuned (default: 40)")
    p.add_argument("--task", default="builtin", help="task name (default: builtin)")
    p.add_argument("--output", default=None, help="output folder (default: results/sweep/GRID, GRID-finetune with --finetune)")
    p.add_argument("--finetune", action="store_true", help="finetune every point (with distillation) before measuring")
    p.add_argument("--num-test-examples", type=_positive_int, default=None, help="test split size (default: the task's)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="evaluation batch size (default: 64)")
    p.add_argument("--rounds", type=_positive_int, default=3, help="timed rounds per point; the median is reported (default: 3)")
    p.add_argument("--timing-batches", type=_positive_int, default=2, help="test batches per timed round (default: 2)")
    p.add_argument("--no-plot", action="store_true", help="do not write the figure and tables at the end")
    p.add_argument("--list-points", action="store_true", help="print the grid's points (method, label, group, finetune overrides), measure nothing")
    p.add_argument("--cache-dir", default=None, help="where the built-in model is cached")
    _add_finetune_options(p)
    _add_data_options(p)
    _add_common(p)
    p.set_defaults(func=run)


def _targets(text: str) -> list[float]:
    """An argparse type: comma-separated speed-up targets, each above 1."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated speed-ups such as 1.2,1.4, got {text!r}") from None
    if not values or any(not 1.0 < v < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"expected speed-ups above 1, got {text!r}")
    return values


def _tune_parser(sub: Any, run: Command) -> None:
    p = sub.add_parser("tune", help="search a method's knobs for the most accurate config meeting a speed-up target",
                       description="Optuna search on a val subset (FLOPs speed-up as the fast proxy, successive halving on "
                                   "val accuracy, resumable from OUTPUT/study.journal); with --measure throughput the best "
                                   "trials are confirmed by interleaved timing. The winner is evaluated on the test split as a "
                                   "compare row and written as OUTPUT/METHOD-tuned.json (compare --config accepts it).")
    p.add_argument("--method", default="pumer", help="reduction method (default: pumer)")
    p.add_argument("--target-speedup", type=_positive_float, required=True, help="speed-up over the dense model, e.g. 1.5")
    p.add_argument("--measure", choices=("flops", "throughput"), default="flops",
                   help="what must reach the target: FLOPs speed-up, or throughput measured interleaved (default: flops)")
    p.add_argument("--budget", type=_positive_int, default=40, help="distinct configs the study should have tried, resumed trials included; a config drawn again is not re-run and not counted (default: 40)")
    p.add_argument("--task", default="builtin", help="task name (default: builtin)")
    p.add_argument("--num-val-examples", type=_positive_int, default=256, help="val examples per trial (default: 256)")
    p.add_argument("--num-test-examples", type=_positive_int, default=None, help="test split size (default: the task's)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="evaluation batch size (default: 64)")
    p.add_argument("--confirm", type=_positive_int, default=6, help="--measure throughput: most accurate trials timed (default: 6)")
    p.add_argument("--flops-margin", type=_positive_float, default=None,
                   help="trials need a FLOPs speed-up of target x margin (default: 1.0 for flops, 1.1 for throughput)")
    p.add_argument("--rounds", type=_positive_int, default=3, help="timed rounds; the median is reported (default: 3)")
    p.add_argument("--timing-batches", type=_positive_int, default=2, help="batches per timed round (default: 2)")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the TPE sampler (default: 0)")
    p.add_argument("--output", default=None, help="output folder (default: results/tune/METHOD-xTARGET-MEASURE)")
    p.add_argument("--cache-dir", default=None, help="where the built-in model is cached")
    _add_data_options(p)
    _add_common(p)
    p.set_defaults(func=run)


def _show_parser(sub: Any, run: Command) -> None:
    p = sub.add_parser("show", help="draw which patches and words a method keeps, merges and prunes at every reduction layer",
                       description="For examples of a task split: the image once per reduction layer (pruned patches grey, "
                                   "merged groups outlined in one colour each), the layer's text-saliency map, the surviving "
                                   "words, and the dense and reduced answers; one PNG and SVG per example.")
    p.add_argument("--method", default="pumer", help="reduction method (default: pumer)")
    p.add_argument("--config", default=None, metavar="PRESET_OR_FILE", help="method config (default: the task's preset)")
    p.add_argument("--task", default="builtin", help="task name (default: builtin)")
    p.add_argument("--split", default="test", help="split to draw from (default: test)")
    p.add_argument("--index", type=_non_negative_int, nargs="+", default=[0], help="example index(es) in the split (default: 0)")
    p.add_argument("--image", default=None, help="instead of --index: an image file to draw (with --question; the built-in ViLT task only)")
    p.add_argument("--question", default=None, help="the question about --image")
    p.add_argument("--model", default=None, help="the model the task loads (tasks on a user's checkpoint)")
    p.add_argument("--data-dir", default=None, help="the task's data folder (tasks on a user's data: docs/reproduce.md)")
    p.add_argument("--trust-remote-code", action="store_true", help="let the model directory's own code run (off by default)")
    p.add_argument("--output", default="results/show", help="output folder (default: results/show)")
    p.add_argument("--cache-dir", default=None, help="where the built-in model is cached")
    _add_common(p)
    p.set_defaults(func=run)


def _plot_parser(sub: Any, run: Command) -> None:
    p = sub.add_parser("plot", help="accuracy vs throughput increase figure and Table 3/4 layouts from sweep results",
                       description="Write tradeoff.png/.svg (Pareto front marked, dense as reference) and the grid's "
                                   "table next to the results (or into --output): table3.md/table4.md for those "
                                   "presets, table.md for other grids.")
    p.add_argument("results", help="results.jsonl written by pumer-plug sweep")
    p.add_argument("--output", default=None, help="output folder (default: the results file's folder)")
    p.add_argument("--title", default=None, help="figure title")
    p.add_argument("--annotate", choices=("auto", "yes", "no"), default="auto",
                   help="label every point (auto: when there are at most 12)")
    p.set_defaults(func=run)


def _gpu_check_parser(sub: Any, run: Command) -> None:
    p = sub.add_parser("gpu-check", help="the prepared GPU run: gpu-marked tests, then dense vs. PuMer in fp16",
                       description="Runs the gpu-marked tests (from a repository checkout, if present) and measures "
                                   "dense vs. PuMer on ViLT-B/32, METER base and BridgeTower base in fp16 at the largest "
                                   "batch that fits; writes gpu-check.jsonl and gpu-check.md. Installs nothing.")
    p.add_argument("--output", default="results/gpu-check", help="output folder (default: results/gpu-check)")
    p.add_argument("--models", default="vilt-b32,meter-base,bridgetower-base", help="comma-separated bench models")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="float16", help="model and input dtype (default: float16)")
    p.add_argument("--rounds", type=_positive_int, default=3, help="timed rounds; median reported (default: 3)")
    p.add_argument("--max-batch-size", type=_positive_int, default=1024, help="cap of the batch-size search (default: 1024)")
    p.add_argument("--train-batch-size", type=_positive_int, default=32,
                   help="batch of the training-step memory figure, at most the found one (default: 32)")
    p.add_argument("--skip-tests", action="store_true", help="measure only")
    p.add_argument("--device", default="cuda", help="cuda or cuda:N (default: cuda)")
    p.set_defaults(func=run)


def _list_parser(sub: Any, run: Command) -> None:
    p = sub.add_parser("list", help="methods (config fields, presets), adapters, tasks and bench model setups")
    p.set_defaults(func=run)


def build_parser(commands: dict[str, Command]) -> argparse.ArgumentParser:
    """The ``pumer-plug`` parser; ``commands`` maps every subcommand name to the function it runs."""
    parser = _Parser(prog="pumer-plug", description="Plug-in token reduction (PuMer) for vision-language transformers.")
    parser.set_defaults(num_threads=None)  # commands without --num-threads (plot, list)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    parsers = {"compare": _compare_parser, "bench": _bench_parser, "train": _train_parser, "finetune": _finetune_parser,
               "sweep": _sweep_parser, "plot": _plot_parser, "tune": _tune_parser, "show": _show_parser,
               "list": _list_parser, "gpu-check": _gpu_check_parser}
    unknown = sorted(set(commands) - set(parsers))
    if unknown:
        raise ValueError(f"no parser for command(s) {unknown}")
    for name, add in parsers.items():
        if name in commands:
            add(sub, commands[name])
    return parser


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (the usage block stays behind ``--help``)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


