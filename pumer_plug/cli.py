"""The ``pumer-plug`` command: compare, bench, train, list.

Every user error (unknown method or preset, unreadable config, bad option value) ends in one
line on stderr naming the problem and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import torch


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


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


def _parse_methods(text: str) -> list[str]:
    from pumer_plug import list_methods

    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m != "dense" and m not in list_methods()]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from: dense, {', '.join(list_methods())}")
    return [m for m in names if m != "dense"]


def _method_configs(methods: list[str], specs: Sequence[str], task: Any) -> dict[str, Any]:
    """``--config`` values are ``[METHOD=]PRESET_OR_FILE``; without ``METHOD=`` they go to every method."""
    from pumer_plug.configs import load_method_config

    chosen: dict[str, Any] = {}
    for spec in specs:
        method, _, value = spec.rpartition("=") if "=" in spec else ("", "", spec)
        targets = [method] if method else methods
        for m in targets:
            if m not in methods:
                raise ValueError(f"--config {spec!r} names method {m!r}, which is not in --methods {methods}")
            chosen[m] = load_method_config(m, value)
    return {m: chosen.get(m) or task.default_config(m) for m in methods}


def cmd_compare(args: argparse.Namespace) -> int:
    from pumer_plug.evaluation.compare import MethodSpec, run_compare
    from pumer_plug.evaluation.report import format_table, write_results
    from pumer_plug.evaluation.tasks import get_task

    methods = _parse_methods(args.methods)
    task = get_task(args.task, cache_dir=args.cache_dir, retrain=args.retrain)
    configs = _method_configs(methods, args.config or [], task)
    specs = [MethodSpec(m, configs[m]) for m in methods]
    batch_size = args.batch_size
    if args.find_batch_size:
        batch_size = task.find_batch_size(args.device)
    rows = run_compare(task, specs, batch_size=batch_size, device=args.device, rounds=args.rounds,
                       timing_batches=args.timing_batches)
    print(format_table(rows))
    paths = write_results(rows, args.output)
    print(f"\nwritten: {paths['jsonl']} and {paths['markdown']} ({rows[0].get('memory_method')} peak memory)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pumer_plug.configs import load_method_config
    from pumer_plug.evaluation.bench import BENCH_MODELS, run_bench

    if args.model not in BENCH_MODELS:
        raise ValueError(f"unknown bench model {args.model!r}; choose from: {', '.join(sorted(BENCH_MODELS))}")
    setup = BENCH_MODELS[args.model](batch_size=args.batch_size) if args.batch_size else BENCH_MODELS[args.model]()
    if args.config:
        setup.config = load_method_config(args.method, args.config)
    elif args.method != "pumer":
        setup.config = load_method_config(args.method, None)
    result = run_bench(setup, method=args.method, rounds=args.rounds)
    keys = ("benchmark", "config", "dense_throughput_per_s", "reduced_throughput_per_s", "throughput_increase",
            "dense_gflops_per_example", "reduced_gflops_per_example", "flops_ratio", "reducer_time_share")
    for key in keys:
        value = result[key]
        print(f"{key:28s} {value:.4g}" if isinstance(value, float) else f"{key:28s} {value}")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        with open(args.output, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from pumer_plug.evaluation.tasks import get_task

    task = get_task("builtin", cache_dir=args.cache_dir, retrain=True)
    model = task.load_model(torch.device(args.device))
    print(f"trained the built-in model: {sum(p.numel() for p in model.parameters()):,} parameters, cached in {task.cache_dir}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from pumer_plug import PumerConfig, list_adapters, list_methods

    print("methods: ", ", ".join(list_methods()))
    print("adapters:", ", ".join(list_adapters()))
    print("PuMer presets:")
    for name in PumerConfig.list_presets():
        print(f"  {name:16s} {PumerConfig.preset(name).describe():40s} source: {PumerConfig.PRESET_SOURCES[name]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pumer-plug", description="Plug-in token reduction (PuMer) for vision-language transformers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("compare", help="dense model vs. reduction methods on a task (accuracy, throughput, memory, FLOPs)",
                       description="Evaluate the dense model and each method on the task's test split; print a table and write results.jsonl/results.md.")
    p.add_argument("--task", default="builtin", help="task name (default: builtin, the digits VQA task trained here)")
    p.add_argument("--methods", default="dense,pumer", help="comma-separated methods from the registry (default: dense,pumer)")
    p.add_argument("--config", action="append", metavar="[METHOD=]PRESET_OR_FILE",
                   help="method config: a preset name or a JSON/YAML file; repeatable; default: the task's preset per method")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="evaluation batch size (default: 64)")
    p.add_argument("--find-batch-size", action="store_true", help="CUDA only: search the largest batch that fits")
    p.add_argument("--rounds", type=_positive_int, default=5, help="timed rounds per variant; the median is reported (default: 5)")
    p.add_argument("--timing-batches", type=_positive_int, default=4, help="test batches per timed round (default: 4)")
    p.add_argument("--output", default="results/compare", help="output folder for results.jsonl and results.md")
    p.add_argument("--cache-dir", default=None, help="where the built-in model is cached (default: $PUMER_PLUG_CACHE or ~/.cache/pumer-plug)")
    p.add_argument("--retrain", action="store_true", help="retrain the built-in model even if a cached one exists")
    _add_common(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("bench", help="speed benchmark on a backbone built from its config (random init)",
                       description="Dense vs. plugged throughput (interleaved), FLOPs ratio and the reducers' time share.")
    p.add_argument("--model", default="vilt-b32", help="benchmark setup (default: vilt-b32)")
    p.add_argument("--method", default="pumer", help="reduction method (default: pumer)")
    p.add_argument("--config", default=None, help="preset name or JSON/YAML file (default: the setup's config)")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="batch size (default: the setup's)")
    p.add_argument("--rounds", type=_positive_int, default=5, help="timed rounds; median reported (default: 5)")
    p.add_argument("--output", default=None, help="append the result as a JSON line to this file")
    _add_common(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("train", help="(re)train the built-in digits VQA model and cache it")
    p.add_argument("--cache-dir", default=None, help="cache folder (default: $PUMER_PLUG_CACHE or ~/.cache/pumer-plug)")
    _add_common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("list", help="registered methods, adapters and presets")
    p.set_defaults(func=cmd_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "num_threads", None):
        torch.set_num_threads(args.num_threads)
    try:
        return args.func(args)
    except (ValueError, OSError) as err:
        print(f"pumer-plug: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pumer-plug: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
