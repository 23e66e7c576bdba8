"""The ``pumer-plug`` command: compare, bench, train, list, finetune, sweep, plot.

Every user error (:class:`~pumer_plug.errors.UserError`: unknown method, task or preset, unreadable
config, bad option or config value, a model an adapter does not fit) ends in one line on stderr
naming the problem and exit status 2; any other exception is a bug and shows its traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Sequence

from pumer_plug.cli_parser import build_parser
from pumer_plug.errors import UserError
from pumer_plug.evaluation.parallel import check_command, is_main_process, launched_processes


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
    given: dict[str, str] = {}
    for spec in specs:
        method, _, value = spec.rpartition("=") if "=" in spec else ("", "", spec)
        targets = [method] if method else methods
        for m in targets:
            if m not in methods:
                raise UserError(f"--config {spec!r} names method {m!r}, which is not in --methods {methods}")
            if m in given:
                raise UserError(f"--config {spec!r} gives method {m!r} a second config (after --config {given[m]!r}); "
                                "one config per method (compare several configs of a method with sweep)")
            given[m] = spec
            chosen[m] = load_config(m, value)
    return {m: chosen.get(m) or task.default_config(m) for m in methods}


#: folders this command created (deepest first): removed again if it fails and leaves them empty
_created_folders: list[Path] = []


def _remove_empty_created_folders() -> None:
    for folder in _created_folders:
        try:
            folder.rmdir()  # only an empty folder goes
        except OSError:
            pass
    _created_folders.clear()


def _output_folder(path: str | Path, option: str = "--output") -> Path:
    """Creates the output folder ``path`` (and parents) before any work starts; a file there is refused.
    A command that then fails removes the folders it created if they are still empty.

    Raises:
        UserError: ``path`` is a file, or the folder cannot be created or written.
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{option} {path} is a file; {option} takes a folder")
    missing = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _created_folders.extend(missing)
    except OSError as err:
        raise UserError(f"cannot create the {option} folder {path}: {err.strerror or err}") from None
    if not os.access(folder, os.W_OK):
        raise UserError(f"cannot write into the {option} folder {path}")
    return folder


def _task_options(args: argparse.Namespace, **fields: Any) -> Any:
    """The ``TaskOptions`` of a command: ``fields`` plus the model and data options (``--model``, ``--data-dir``, ...)."""
    from pumer_plug.evaluation.tasks import TaskOptions

    return TaskOptions(model=args.model, data_dir=args.data_dir, split=args.split, limit=args.limit, workers=args.workers,
                       skip_bad_images=args.skip_bad_images, trust_remote_code=args.trust_remote_code,
                       overwrite=args.overwrite, rerank_top_k=args.rerank_top_k,
                       first_stage_scores=args.first_stage_scores, **fields)


def cmd_compare(args: argparse.Namespace) -> int:
    import torch

    from pumer_plug.evaluation.studies.compare import MethodSpec, run_compare
    from pumer_plug.evaluation.studies.report import (format_memory_note, format_references, format_speedup_note,
                                                      format_table, format_timing_note, write_results)
    from pumer_plug.evaluation.tasks import get_task

    if args.find_batch_size and torch.device(args.device).type != "cuda":
        raise UserError(f"--find-batch-size needs a CUDA device, got --device {args.device}; pass --batch-size instead")
    _output_folder(args.output)
    methods = _parse_methods(args.methods)
    task = get_task(args.task, _task_options(args, cache_dir=args.cache_dir, retrain=args.retrain,
                                             num_test_examples=args.num_test_examples))
    configs = _method_configs(methods, args.config or [], task)
    specs = [MethodSpec(m, configs[m]) for m in methods]
    if task.generates:  # a decoder VLM: time to first token, decode tokens/s, KV cache
        return _compare_generative(task, specs, args)
    rows = run_compare(task, specs, batch_size=None if args.find_batch_size else args.batch_size, device=args.device,
                       rounds=args.rounds, timing_batches=args.timing_batches, dtype=args.dtype,
                       predictions_dir=args.output if args.save_predictions or task.writes_predictions else None)
    if not is_main_process():  # accelerate launch: the main process prints and writes
        return 0
    references = task.reference_accuracies()
    print(format_table(rows, wide=args.wide, references=references))
    if references:
        print(format_references(references, rows))
    for row in rows:  # the task's other metrics (per answer type, IR recall, ...), one line per method
        extra = {k: v for k, v in row.get("metrics", {}).items() if k != task.metric and v is not None}
        if extra:
            print(f"{row['method']}: " + ", ".join(f"{k} {100 * v:.2f}%" if k != "rsum" else f"{k} {v:.2f}"
                                                     for k, v in extra.items()))
    for key, value in task.run_notes().items():
        print(f"{key}: {value}")
    paths = write_results(rows, args.output, references)
    print(f"\nwritten: {paths['jsonl']} and {paths['markdown']} (all columns)")
    print(format_memory_note(rows))
    print(format_speedup_note(rows))
    if format_timing_note(rows):
        print(format_timing_note(rows))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pumer_plug.evaluation.studies.bench import run_bench, setup_config
    from pumer_plug.evaluation.tasks import check_methods_fit, load_config
    from pumer_plug.registry import BENCH_MODELS

    output = _output_folder(args.output) if args.output else None
    make_setup = BENCH_MODELS.get(args.model)
    config = load_config(args.method, args.config) if args.config else None
    setup = make_setup(batch_size=args.batch_size) if args.batch_size else make_setup()
    if setup.runner is not None:  # a decoder VLM measures prefill and decode itself
        return _write_bench_rows(setup.runner(args.method, args.rounds), output)
    setup.config = config if config is not None else setup_config(setup, args.method)
    try:
        check_methods_fit(setup.model, setup.adapter, [(args.method, setup.config)])
    except UserError as error:
        hint = "" if args.config else f"; pass --config with a {args.method} config that fits {args.model}"
        raise UserError(f"{error}{hint}") from None
    result = run_bench(setup, method=args.method, rounds=args.rounds, device=args.device, dtype=args.dtype,
                       train_memory=args.train_memory)
    keys = ("benchmark", "config", "device", "dtype", "dense_throughput_per_s", "reduced_throughput_per_s", "throughput_increase",
            "dense_gflops_per_example", "reduced_gflops_per_example", "flops_ratio")
    if args.train_memory:
        keys += ("dense_peak_memory_mib", "reduced_peak_memory_mib", "memory_reduction", "dense_train_peak_memory_mib",
                 "reduced_train_peak_memory_mib", "train_memory_reduction")
    for key in keys:
        value = result[key]
        print(f"{key:28s} {value:.4g}" if isinstance(value, float) else f"{key:28s} {value}")
    print(f"{'reducer time share':28s} {100 * result['reducer_time_share']:.1f}% of the plugged forward's wall time")
    if output is not None:
        with open(output / "bench.jsonl", "a") as f:
            f.write(json.dumps(result) + "\n")
        print(f"written: {output / 'bench.jsonl'}")
    return 0


def cmd_gpu_check(args: argparse.Namespace) -> int:
    from pumer_plug.evaluation.studies.gpu_check import markdown_table, run_gpu_check

    records = run_gpu_check(args.output, models=[m for m in args.models.split(",") if m], dtype=args.dtype,
                            rounds=args.rounds, max_batch_size=args.max_batch_size,
                            train_batch_size=args.train_batch_size, tests=not args.skip_tests, device=args.device)
    print(markdown_table(records))
    print(f"written: {Path(args.output) / 'gpu-check.jsonl'} and {Path(args.output) / 'gpu-check.md'}")
    return 0


def _compare_generative(task: Any, specs: list, args: argparse.Namespace) -> int:
    import torch

    from pumer_plug.evaluation.studies.decoder_compare import format_decoder_table, run_decoder_compare, write_decoder_results
    from pumer_plug.evaluation.studies.report import format_references

    if torch.device(args.device).type != "cpu" or args.dtype != "float32":
        raise UserError(f"task {task.name!r} is compared on the CPU in float32 (got --device {args.device}, --dtype {args.dtype})")
    rows = run_decoder_compare(task, specs, batch_size=args.batch_size, rounds=args.rounds)
    if not is_main_process():
        return 0
    references = task.reference_accuracies()
    print(format_decoder_table(rows, references))
    print(format_references(references, rows))
    paths = write_decoder_results(rows, args.output, references)
    print(f"\nwritten: {paths['jsonl']} and {paths['markdown']} (full configs, environment)")
    return 0


def _write_bench_rows(rows: list[dict], output: Path | None) -> int:
    from pumer_plug.evaluation.decoder_bench import format_rows

    print(format_rows(rows))
    if output is not None:
        with open(output / "bench.jsonl", "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from pumer_plug.evaluation.tasks import builtin, builtin_llava

    if args.model == "llava":  # the built-in decoder VLM: same cache interface, its own folder
        model, _ = builtin_llava.load_builtin_llava(args.cache_dir, retrain=True, seed=args.seed)
        cache_dir, metadata_file = builtin_llava.builtin_llava_dir(args.cache_dir), builtin_llava.METADATA_FILE
    else:
        model, _ = builtin.load_builtin_model(args.cache_dir, retrain=True, seed=args.seed)
        cache_dir, metadata_file = builtin.builtin_model_dir(args.cache_dir), builtin.METADATA_FILE
    info = json.loads((cache_dir / metadata_file).read_text())
    print(f"trained the built-in model: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"seed {info['seed']}, {info['steps']} steps in {info['train_seconds']:.0f} s, cached in {cache_dir}")
    rows = [("all", info["val_accuracy"])] + sorted(info["val_accuracy_by_question_type"].items())
    rows += [("majority answer", info["val_majority_accuracy"]), ("question-only prior", info["val_question_prior_accuracy"])]
    print(tabulate([(name, f"{100 * acc:.1f}") for name, acc in rows], headers=["val questions", "accuracy %"]))
    return 0


def _field_text(field: Any) -> str:
    import dataclasses

    if field.default is not dataclasses.MISSING:
        return f"{field.name}={field.default!r}"
    if field.default_factory is not dataclasses.MISSING:
        return f"{field.name}={field.default_factory()!r}"
    return field.name


def cmd_list(args: argparse.Namespace) -> int:
    import dataclasses

    from pumer_plug.registry import ADAPTERS, BENCH_MODELS, METHODS, TASKS

    # Names, summaries and config classes of the built-in entries come from their declarations in
    # pumer_plug.catalog: listing imports no method, adapter, task or bench module (and no torch).
    print("methods (config fields with defaults; presets):")
    for name in METHODS.list():
        config_cls = METHODS.attribute(name, "config_class")
        print(f"  {name}: {config_cls.__name__}")
        print(_wrapped("fields: " + ", ".join(_field_text(f) for f in dataclasses.fields(config_cls)), "    "))
        for preset in config_cls.list_presets():
            print(_wrapped(f"preset {preset:16s} {config_cls.preset(preset).describe()}", "    "))
            if config_cls.PRESET_SOURCES.get(preset):
                print(_wrapped(f"source: {config_cls.PRESET_SOURCES[preset]}", " " * 28))
    for title, registry in (("adapters (pumer_plug.apply(model, adapter=NAME); 'auto' picks one):", ADAPTERS),
                            ("tasks (compare/sweep/finetune --task NAME):", TASKS),
                            ("bench model setups (bench --model NAME):", BENCH_MODELS)):
        print(title)
        for name in registry.list():
            print(_wrapped(f"{name:16s} {registry.summary(name)}", "  ", " " * 19))
    return 0


def _wrapped(text: str, indent: str, subsequent: str | None = None) -> str:
    """``text`` wrapped to the 120 columns the CLI's output keeps to."""
    import textwrap

    return textwrap.fill(text, 120, initial_indent=indent, subsequent_indent=subsequent or indent + "  ",
                         break_on_hyphens=False)


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
    from pumer_plug.evaluation.tasks import get_task
    from pumer_plug.evaluation.training.finetune import finetune

    if "," in args.method:
        raise UserError(f"--method takes one method, got {args.method!r}")
    method = "none" if args.method in ("none", "dense") else _parse_methods(args.method)[0]
    if method == "none" and args.config:
        raise UserError("--config needs a reduction --method (the dense model has no config)")
    config = _finetune_config(args, method=method, method_config=args.config, checkpoint_every=args.checkpoint_every)
    output = _output_folder(args.output or f"results/finetune/{method}")
    task = get_task(args.task, _task_options(args, cache_dir=args.cache_dir))
    result = finetune(task, config, output, resume=args.resume, device=args.device)
    if not is_main_process():  # accelerate launch: the main process prints
        return 0
    initial = result.initial_val_accuracy
    print(f"finetuned {method} for {result.epochs_run} epoch(s), {result.steps} steps, {result.seconds:.0f} s"
          f"{' (stopped early)' if result.stopped_early else ''}")
    if initial is not None:
        print(f"val accuracy: {100 * initial:.2f}% before, {100 * result.best_val_accuracy:.2f}% best "
              f"(epoch {result.best_epoch + 1} of {result.epochs_run}; finetune.json and metrics.jsonl count epochs "
              f"from 0: best_epoch {result.best_epoch})")
    print(f"written: {output} (weights, method.json, metrics.jsonl, finetune.json, checkpoint/)")
    return 0


#: ``sweep`` warns when a point's speed-up exceeds its FLOPs reduction by more than this factor
NOISY_SPEEDUP = 1.5


def cmd_sweep(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from pumer_plug.evaluation.studies.plot import plot_results
    from pumer_plug.evaluation.studies.sweep import load_grid, read_records, run_sweep
    from pumer_plug.evaluation.tasks import get_task

    if args.tuned:
        from pumer_plug.evaluation.studies.tune import tuned_grid

        if launched_processes() > 1:
            raise UserError("sweep --tuned searches in one process; run it without torchrun / accelerate launch "
                            "(sweep --grid runs data-parallel)")

        studies = _output_folder(args.output or "results/sweep/figure5-tuned")  # the tuning studies go to STUDIES/tune/
        task = get_task(args.task, _task_options(args, cache_dir=args.cache_dir, num_test_examples=args.num_test_examples))
        methods = _parse_methods(args.tune_methods) if args.tune_methods else None  # None: every method that fits
        grid = tuned_grid(task, methods, args.tuned, studies, measure=args.tune_measure, budget=args.tune_budget,
                          device=args.device)
    elif args.grid is None:
        raise UserError("sweep needs --grid PRESET_OR_FILE or --tuned TARGETS")
    else:
        grid = load_grid(args.grid)
    finetune_base = _finetune_config(args) if args.finetune else None
    output = Path(args.output or f"results/sweep/{grid.name}{'-finetune' if args.finetune else ''}")
    if args.list_points:  # the full config of every point goes into results.jsonl ("config")
        print(tabulate([[p.method, p.label, p.group or "", ", ".join(f"{k}={v}" for k, v in dict(p.finetune).items())]
                        for p in grid.points], headers=["method", "label", "group", "finetune"],
                       tablefmt="plain", disable_numparse=True))
        return 0
    _output_folder(output)
    task = get_task(args.task, _task_options(args, cache_dir=args.cache_dir, num_test_examples=args.num_test_examples))
    results = output / "results.jsonl"
    records = run_sweep(task, grid.points, results, name=grid.name, finetune_base=finetune_base,
                        batch_size=args.batch_size, device=args.device, rounds=args.rounds,
                        timing_batches=args.timing_batches)
    if not is_main_process():  # accelerate launch: the main process prints, writes and plots
        return 0
    if not records:
        print(f"every point of {grid.name} has finished in {results}; nothing to measure")
    references = task.reference_accuracies() if records else {}
    floor = max(references.values(), default=0.0)  # below it: worse than ignoring the image (marked !)
    rows = [[r.get("method", "dense"), ", ".join(r.get("labels") or [r["label"]]), r["status"],
             "-" if r.get("accuracy") is None else f"{100 * r['accuracy']:.2f}%" + (" !" if r["accuracy"] < floor else ""),
             "-" if r.get("throughput_increase") is None else f"{r['throughput_increase']:.2f}x", r.get("error") or ""]
            for r in records]
    if rows:
        print(tabulate(rows, headers=["method", "label", "status", "accuracy", task.speedup_label, "error"],
                       tablefmt="github", disable_numparse=True))
    if references:
        from pumer_plug.evaluation.studies.report import format_references

        print(format_references(references, [{"method": ", ".join(r.get("labels") or [r["label"]]), "accuracy": r["accuracy"]}
                                             for r in records if r.get("accuracy") is not None]))
    noisy = [r for r in records if r.get("throughput_increase") and r.get("flops_ratio")
             and r["throughput_increase"] * r["flops_ratio"] > NOISY_SPEEDUP]
    if noisy:  # a speed-up well beyond the FLOPs cut: timing disturbed (other jobs on the cores), not a gain
        print(f"warning: speed-up above {NOISY_SPEEDUP:g}x the FLOPs reduction, likely timing noise (other jobs on the "
              f"cores?); re-run those points alone or with more --rounds: "
              + ", ".join(f"{', '.join(r.get('labels') or [r['label']])} {r['throughput_increase']:.2f}x vs "
                          f"{1 / r['flops_ratio']:.2f}x fewer FLOPs" for r in noisy))
    if records and len(read_records(results)) > len(records):  # a resumed sweep: earlier runs' points are in the file
        print(f"(this run's points only; every finished point of {grid.name}: {results}"
              + ("" if args.no_plot else f" and {output / 'table.md'}") + ")")
    failed = sum(r["status"] == "error" for r in records)
    print(f"\nwritten: {results}" + (f" ({failed} point(s) failed; re-run to retry them)" if failed else ""))
    if not args.no_plot:
        paths = plot_results(results)
        print("plotted:", ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from pumer_plug.evaluation.studies.plot import plot_results

    annotate = {"auto": None, "yes": True, "no": False}[args.annotate]
    if args.output:
        _output_folder(args.output)
    paths = plot_results(args.results, args.output, title=args.title, annotate=annotate)
    print("written:", ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from pumer_plug.evaluation.studies.report import format_references, format_table, write_results
    from pumer_plug.evaluation.studies.tune import format_result, run_tune
    from pumer_plug.evaluation.tasks import get_task

    method = _parse_methods(args.method)[0] if "," not in args.method else None
    if method is None or method == "dense":
        raise UserError(f"--method takes one reduction method, got {args.method!r}")
    output = _output_folder(args.output or f"results/tune/{method}-x{args.target_speedup:g}-{args.measure}")
    task = get_task(args.task, _task_options(args, cache_dir=args.cache_dir, num_test_examples=args.num_test_examples))
    result = run_tune(task, method, args.target_speedup, measure=args.measure, budget=args.budget, output_dir=output,
                      num_val_examples=args.num_val_examples, batch_size=args.batch_size, confirm=args.confirm,
                      flops_margin=args.flops_margin, rounds=args.rounds, timing_batches=args.timing_batches,
                      device=args.device, seed=args.seed)
    print(format_result(result))
    if result.rows and not task.held_out_test_split():
        print(f"note: task {task.name!r} evaluates the split it tuned on (--split {task.split}, the val split too): "
              "the test row is not held out")
    if not result.rows:
        return 0
    references = task.reference_accuracies()
    if task.generates:  # a decoder VLM's rows: time to first token, decode tokens/s, KV cache
        from pumer_plug.evaluation.studies.decoder_compare import format_decoder_table, write_decoder_results

        print(format_decoder_table(result.rows, references))
        write_decoder_results(result.rows, output, references)
    else:
        print(format_table(result.rows, references=references))
        write_results(result.rows, output, references)
    if references:
        print(format_references(references, result.rows))
    compare = shlex.join(["pumer-plug", "compare", *_task_flags(args), "--methods", f"dense,{method}",
                          "--config", f"{method}={result.config_path}"])
    print(f"\nwritten: {result.config_path} ({compare}), {output}/frontier.jsonl, {output}/results.jsonl")
    return 0


def _task_flags(args: argparse.Namespace) -> list[str]:
    """The options that chose the task, its model and data, as a command line takes them again."""
    flags = ["--task", args.task]
    for option in ("model", "data_dir", "split", "limit", "cache_dir", "num_test_examples"):
        value = getattr(args, option, None)
        if value is not None:
            flags += [f"--{option.replace('_', '-')}", str(value)]
    return flags + (["--trust-remote-code"] if getattr(args, "trust_remote_code", False) else [])


def cmd_show(args: argparse.Namespace) -> int:
    from pumer_plug.evaluation.studies.show import example, run_show
    from pumer_plug.evaluation.tasks import TaskOptions, get_task, load_config

    method = _parse_methods(args.method)[0] if "," not in args.method else None
    if method is None:
        raise UserError(f"--method takes one reduction method, got {args.method!r}")
    if (args.image is None) != (args.question is None):
        raise UserError("--image and --question go together")
    if args.image is not None and not Path(args.image).is_file():
        raise UserError(f"--image {args.image}: no such file")
    _output_folder(args.output)  # a file there is refused before any work
    task = get_task(args.task, TaskOptions(cache_dir=args.cache_dir, model=args.model, data_dir=args.data_dir,
                                           trust_remote_code=args.trust_remote_code))
    config = load_config(method, args.config) if args.config else task.default_config(method)
    if args.image is None:
        example(task, args.split, max(args.index))  # an index past the split is refused before anything is drawn
    written = []
    for index in args.index if args.image is None else [None]:
        result, paths = run_show(task, method, config, split=args.split, index=index or 0, output_dir=args.output,
                                 device=args.device, image=args.image, question=args.question)
        counts = ", ".join(f"layer {v.layer}: {v.image_tokens}" for v in result.layers)
        print(f"example {args.image if index is None else index}: answer {result.target}, dense {result.dense_answer}, {method} {result.reduced_answer}; "
              f"image tokens {counts}")
        written += [str(paths["png"]), str(paths["svg"])]
    print("written:", ", ".join(written))
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


def commands() -> dict[str, Any]:
    """The subcommands, name -> function (looked up at call time)."""
    return {"compare": cmd_compare, "bench": cmd_bench, "train": cmd_train, "finetune": cmd_finetune,
            "sweep": cmd_sweep, "plot": cmd_plot, "tune": cmd_tune, "show": cmd_show, "list": cmd_list,
            "gpu-check": cmd_gpu_check}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(commands())
    args = parser.parse_args(argv)
    if args.num_threads:
        import torch  # only here and in the commands: `--help` starts without torch

        torch.set_num_threads(args.num_threads)
    old_show_warning = warnings.showwarning
    warnings.showwarning = _one_line_warnings(old_show_warning)
    in_main_thread = threading.current_thread() is threading.main_thread()
    old_sigterm = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        check_command(args.command)  # several processes (accelerate launch): compare, sweep, finetune only
        return args.func(args)
    except BrokenPipeError:  # the reader of our output went away (`pumer-plug list | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes stdout
        return 0
    except (UserError, OSError) as err:  # OSError: a file the user named cannot be read or written
        _remove_empty_created_folders()
        if is_main_process():  # under a launcher every process refuses alike: one line, not one per process
            print(f"pumer-plug: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _remove_empty_created_folders()
        print("pumer-plug: interrupted", file=sys.stderr)
        return 130
    finally:
        _created_folders.clear()
        warnings.showwarning = old_show_warning
        if in_main_thread:
            signal.signal(signal.SIGTERM, old_sigterm)


if __name__ == "__main__":
    sys.exit(main())
