"""The ``pumer-plug`` command: compare, bench, train, list, finetune, sweep, plot.

Every user error (:class:`~pumer_plug.errors.UserError`: unknown method, task or preset, unreadable
config, bad option or config value, a model an adapter does not fit) ends in one line on stderr
naming the problem and exit status 2; any other exception is a bug and shows its traceback.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from pumer_plug.cli_parser import build_parser
from pumer_plug.errors import UserError


def _parse_methods(text: str) -> list[str]:
    from pumer_plug import list_methods

    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m != "dense" and m not in list_methods()]
    if unknown:
        raise UserError(f"unknown method(s) {unknown}; choose from: dense, {', '.join(list_methods())}")
    return [m for m in names if m != "dense"]


def _method_configs(methods: list[str], specs: Sequence[str], task: Any) -> dict[str, Any]:
    """``--config`` values are ``[METHOD=]PRESET_OR_FILE``; without ``METHOD=`` they go to every method."""
    from pumer_plug.evaluation.tasks import load_config

    chosen: dict[str, Any] = {}
    for spec in specs:
        method, _, value = spec.rpartition("=") if "=" in spec else ("", "", spec)
        targets = [method] if method else methods
        for m in targets:
            if m not in methods:
                raise UserError(f"--config {spec!r} names method {m!r}, which is not in --methods {methods}")
            chosen[m] = load_config(m, value)
    return {m: chosen.get(m) or task.default_config(m) for m in methods}


def cmd_compare(args: argparse.Namespace) -> int:
    from pumer_plug.evaluation.studies.compare import MethodSpec, run_compare
    from pumer_plug.evaluation.studies.report import format_references, format_table, write_results
    from pumer_plug.evaluation.tasks import TaskOptions, get_task

    if args.find_batch_size and torch.device(args.device).type != "cuda":
        raise UserError(f"--find-batch-size needs a CUDA device, got --device {args.device}; pass --batch-size instead")
    methods = _parse_methods(args.methods)
    task = get_task(args.task, TaskOptions(cache_dir=args.cache_dir, retrain=args.retrain))
    configs = _method_configs(methods, args.config or [], task)
    specs = [MethodSpec(m, configs[m]) for m in methods]
    if task.generates:  # a decoder VLM: time to first token, decode tokens/s, KV cache
        return _compare_generative(task, specs, args)
    rows = run_compare(task, specs, batch_size=None if args.find_batch_size else args.batch_size, device=args.device,
                       rounds=args.rounds, timing_batches=args.timing_batches, dtype=args.dtype,
                       predictions_dir=args.output if args.save_predictions else None)
    print(format_table(rows))
    references = task.reference_accuracies()
    if references:
        print(format_references(references))
    paths = write_results(rows, args.output, references)
    print(f"\nwritten: {paths['jsonl']} and {paths['markdown']} ({rows[0].get('memory_method')} peak memory)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pumer_plug.evaluation.studies.bench import run_bench  # registers the bench models
    from pumer_plug.evaluation.tasks import load_config
    from pumer_plug.registry import BENCH_MODELS

    make_setup = BENCH_MODELS.get(args.model)
    setup = make_setup(batch_size=args.batch_size) if args.batch_size else make_setup()
    if setup.runner is not None:  # a decoder VLM measures prefill and decode itself
        return _write_bench_rows(setup.runner(args.method, args.rounds), args.output)
    if args.config:
        setup.config = load_config(args.method, args.config)
    elif args.method != "pumer":
        setup.config = load_config(args.method, None)
    result = run_bench(setup, method=args.method, rounds=args.rounds, device=args.device, dtype=args.dtype)
    keys = ("benchmark", "config", "device", "dtype", "dense_throughput_per_s", "reduced_throughput_per_s", "throughput_increase",
            "dense_gflops_per_example", "reduced_gflops_per_example", "flops_ratio", "reducer_time_share")
    for key in keys:
        value = result[key]
        print(f"{key:28s} {value:.4g}" if isinstance(value, float) else f"{key:28s} {value}")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        with open(args.output, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


def _compare_generative(task: Any, specs: list, args: argparse.Namespace) -> int:
    from pumer_plug.evaluation.studies.decoder_compare import format_decoder_table, run_decoder_compare, write_decoder_results
    from pumer_plug.evaluation.studies.report import format_references

    if torch.device(args.device).type != "cpu" or args.dtype != "float32":
        raise UserError(f"task {task.name!r} is compared on the CPU in float32 (got --device {args.device}, --dtype {args.dtype})")
    rows = run_decoder_compare(task, specs, batch_size=args.batch_size, rounds=args.rounds)
    print(format_decoder_table(rows))
    references = task.reference_accuracies()
    print(format_references(references))
    paths = write_decoder_results(rows, args.output, references)
    print(f"\nwritten: {paths['jsonl']} and {paths['markdown']}")
    return 0


def _write_bench_rows(rows: list[dict], output: str | None) -> int:
    from pumer_plug.evaluation.decoder_bench import format_rows

    print(format_rows(rows))
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        with open(output, "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from pumer_plug.evaluation.tasks import builtin, builtin_llava

    if args.model == "llava":  # the built-in decoder VLM: same cache interface, its own folder
        model, _ = builtin_llava.load_builtin_llava(args.cache_dir, retrain=True, seed=args.seed)
        cache_dir, builtin = builtin_llava.builtin_llava_dir(args.cache_dir), builtin_llava
    else:
        model, _ = builtin.load_builtin_model(args.cache_dir, retrain=True, seed=args.seed)
        cache_dir = builtin.builtin_model_dir(args.cache_dir)
    info = json.loads((cache_dir / builtin.METADATA_FILE).read_text())
    print(f"trained the built-in model: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"seed {info['seed']}, {info['steps']} steps in {info['train_seconds']:.0f} s, cached in {cache_dir}")
    rows = [("all", info["val_accuracy"])] + sorted(info["val_accuracy_by_question_type"].items())
    rows += [("majority answer", info["val_majority_accuracy"]), ("question-only prior", info["val_question_prior_accuracy"])]
    print(tabulate([(name, f"{100 * acc:.1f}") for name, acc in rows], headers=["val questions", "accuracy %"]))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from pumer_plug import PumerConfig, list_adapters, list_methods
    from pumer_plug.evaluation.studies import bench  # noqa: F401  (registers the bench models)
    from pumer_plug.evaluation.tasks import TASKS
    from pumer_plug.registry import BENCH_MODELS

    print("methods: ", ", ".join(list_methods()))
    print("adapters:", ", ".join(list_adapters()))
    print("tasks:   ", ", ".join(TASKS.list()))
    print("bench models:", ", ".join(BENCH_MODELS.list()))
    print("PuMer presets:")
    for name in PumerConfig.list_presets():
        print(f"  {name:16s} {PumerConfig.preset(name).describe():40s} source: {PumerConfig.PRESET_SOURCES[name]}")
    return 0


def _finetune_config(args: argparse.Namespace, **fields: Any) -> Any:
    """The ``FinetuneConfig`` of the finetuning options shared by ``finetune`` and ``sweep --finetune``."""
    from pumer_plug.evaluation.training.finetune import FinetuneConfig

    return FinetuneConfig(
        epochs=args.epochs, patience=args.patience, batch_size=args.train_batch_size,
        steps_per_epoch=args.steps_per_epoch, num_train_examples=args.num_train_examples,
        num_val_examples=args.num_val_examples, learning_rate=args.lr, predictor_learning_rate=args.predictor_lr,
        distill=not args.no_distill, distill_weight=args.distill_weight, temperature=args.temperature,
        hidden_distill_weight=args.hidden_distill_weight,
        seed=args.seed, mixed_precision=args.mixed_precision, **fields)


def cmd_finetune(args: argparse.Namespace) -> int:
    from pumer_plug.evaluation.tasks import TaskOptions, get_task
    from pumer_plug.evaluation.training.finetune import finetune

    if "," in args.method:
        raise UserError(f"--method takes one method, got {args.method!r}")
    method = "none" if args.method in ("none", "dense") else _parse_methods(args.method)[0]
    if method == "none" and args.config:
        raise UserError("--config needs a reduction --method (the dense model has no config)")
    config = _finetune_config(args, method=method, method_config=args.config, checkpoint_every=args.checkpoint_every)
    task = get_task(args.task, TaskOptions(cache_dir=args.cache_dir))
    output = Path(args.output or f"results/finetune/{method}")
    result = finetune(task, config, output, resume=args.resume, device=args.device)
    initial = result.initial_val_accuracy
    print(f"finetuned {method} for {result.epochs_run} epoch(s), {result.steps} steps, {result.seconds:.0f} s"
          f"{' (stopped early)' if result.stopped_early else ''}")
    if initial is not None:
        print(f"val accuracy: {100 * initial:.2f}% before, {100 * result.best_val_accuracy:.2f}% best (epoch {result.best_epoch + 1})")
    print(f"written: {output} (weights, method.json, metrics.jsonl, finetune.json, checkpoint/)")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from pumer_plug.evaluation.studies.plot import plot_results
    from pumer_plug.evaluation.studies.sweep import load_grid, run_sweep
    from pumer_plug.evaluation.tasks import TaskOptions, get_task

    grid = load_grid(args.grid)
    finetune_base = _finetune_config(args) if args.finetune else None
    output = Path(args.output or f"results/sweep/{grid.name}{'-finetune' if args.finetune else ''}")
    if args.list_points:
        for point in grid.points:
            print(f"{point.method:11s} {point.label:40s} {point.key(finetune_base)}")
        return 0
    task = get_task(args.task, TaskOptions(cache_dir=args.cache_dir, num_test_examples=args.num_test_examples))
    results = output / "results.jsonl"
    records = run_sweep(task, grid.points, results, name=grid.name, finetune_base=finetune_base,
                        batch_size=args.batch_size, device=args.device, rounds=args.rounds,
                        timing_batches=args.timing_batches)
    if not records:
        print(f"every point of {grid.name} has finished in {results}; nothing to measure")
    rows = [[r.get("method", "dense"), ", ".join(r.get("labels") or [r["label"]]), r["status"],
             "-" if r.get("accuracy") is None else f"{100 * r['accuracy']:.2f}%",
             "-" if r.get("throughput_increase") is None else f"{r['throughput_increase']:.2f}x", r.get("error") or ""]
            for r in records]
    if rows:
        print(tabulate(rows, headers=["method", "label", "status", "accuracy", "throughput increase", "error"],
                       tablefmt="github", disable_numparse=True))
    failed = sum(r["status"] == "error" for r in records)
    print(f"\nwritten: {results}" + (f" ({failed} point(s) failed; re-run to retry them)" if failed else ""))
    if not args.no_plot:
        paths = plot_results(results)
        print("plotted:", ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from pumer_plug.evaluation.studies.plot import plot_results

    annotate = {"auto": None, "yes": True, "no": False}[args.annotate]
    paths = plot_results(args.results, args.output, title=args.title, annotate=annotate)
    print("written:", ", ".join(str(p) for p in paths.values()))
    return 0


def _one_line_warnings(fallback: Any):
    """A ``warnings.showwarning`` that prints our own warnings as one line, others via ``fallback``."""
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if str(message).startswith("pumer-plug:"):
            print(message, file=sys.stderr)
        else:
            fallback(message, category, filename, lineno, file, line)

    return show


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds like an exception, so temporary folders are removed


def main(argv: Sequence[str] | None = None) -> int:
    commands = {"compare": cmd_compare, "bench": cmd_bench, "train": cmd_train, "finetune": cmd_finetune,
                "sweep": cmd_sweep, "plot": cmd_plot, "list": cmd_list}
    parser = build_parser(commands)
    args = parser.parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    old_show_warning = warnings.showwarning
    warnings.showwarning = _one_line_warnings(old_show_warning)
    in_main_thread = threading.current_thread() is threading.main_thread()
    old_sigterm = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        return args.func(args)
    except (UserError, OSError) as err:  # OSError: a file the user named cannot be read or written
        print(f"pumer-plug: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pumer-plug: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = old_show_warning
        if in_main_thread:
            signal.signal(signal.SIGTERM, old_sigterm)


if __name__ == "__main__":
    sys.exit(main())
