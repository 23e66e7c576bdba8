"""``pumer-plug gpu-check``: the one prepared GPU run (issue 13), for the day a GPU is at hand.

It installs nothing. It (1) runs the ``gpu``-marked tests when the repository checkout is next to
the installed package (tests are not in the wheel; otherwise it says so and skips them), then
(2) measures dense vs. PuMer on ViLT-B/32 (VQA shape), METER base (SDPA) and BridgeTower base in
fp16 at the largest batch the dense model runs (the paper's protocol), with CUDA-event timing,
warm-up, ``torch.cuda.max_memory_allocated`` for inference and for one training step. It writes
``gpu-check.jsonl`` (one line per record) and ``gpu-check.md`` (a table) into the output folder.
Sized for about 8 minutes on one H200-class GPU.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from pumer_plug.errors import UserError

MODELS = ("vilt-b32", "meter-base", "bridgetower-base")
TABLE = (("model", "benchmark"), ("batch", "batch_size"), ("dense /s", "dense_throughput_per_s"),
         ("PuMer /s", "reduced_throughput_per_s"), ("speed-up", "throughput_increase"),
         ("GFLOPs ratio", "flops_ratio"), ("inference MiB dense", "dense_peak_memory_mib"),
         ("inference MiB PuMer", "reduced_peak_memory_mib"), ("train batch", "train_batch_size"),
         ("train MiB dense", "dense_train_peak_memory_mib"), ("train MiB PuMer", "reduced_train_peak_memory_mib"),
         ("train memory saved", "train_memory_saved_fraction"))


def repo_tests() -> Path | None:
    """The ``tests/`` folder of the checkout the package runs from (editable install), or None."""
    import pumer_plug

    tests = Path(pumer_plug.__file__).resolve().parents[1] / "tests"
    return tests if (tests / "conftest.py").exists() else None


def run_gpu_tests(output: Path, timeout_s: int = 180) -> dict[str, Any]:
    """Runs ``pytest -m gpu`` on the checkout's tests; a record with the exit code and summary."""
    tests = repo_tests()
    if tests is None:
        return {"kind": "gpu-tests", "skipped": "no repository checkout next to the installed package "
                "(tests are not in the wheel); run `pytest -m gpu` from a checkout"}
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
               f"--junitxml={output / 'gpu-tests.xml'}", str(tests)]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=tests.parent, capture_output=True, text=True, timeout=timeout_s)
        rc, text = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        rc, text = 124, f"timed out after {timeout_s} s\n{err.stdout or ''}"
    (output / "gpu-tests.log").write_text(text)
    summary = [line for line in text.splitlines() if line.strip()][-1:] or [""]
    return {"kind": "gpu-tests", "returncode": rc, "summary": summary[0], "seconds": time.perf_counter() - start}


def _rows_of(batch: dict[str, torch.Tensor]) -> Callable[[int], dict[str, torch.Tensor]]:
    """``make_batch(n)``: the setup's rows repeated to n rows."""
    def make(n: int) -> dict[str, torch.Tensor]:
        rows = next(iter(batch.values())).shape[0]
        index = torch.arange(n) % rows
        return {k: v[index] for k, v in batch.items()}

    return make


def measure_model(name: str, device: torch.device, dtype: str, rounds: int, max_batch_size: int,
                  train_batch_size: int) -> dict[str, Any]:
    """Dense vs. the setup's PuMer on one bench model at the largest dense batch; a JSON-ready record."""
    from pumer_plug.evaluation.measure import DTYPES, find_batch_size, measure_train_step_memory, to_device
    from pumer_plug.evaluation.studies.bench import run_bench
    from pumer_plug.handle import apply
    from pumer_plug.registry import BENCH_MODELS

    start = time.perf_counter()
    setup = BENCH_MODELS.get(name)()
    make_batch = _rows_of(setup.batch)
    model = setup.model.to(device=device, dtype=DTYPES[dtype]).eval()
    cast = lambda b: to_device(b, device, DTYPES[dtype])  # noqa: E731
    batch_size = find_batch_size(model, lambda n: cast(make_batch(n)), None, max_batch_size, device=device)
    setup.batch = make_batch(batch_size)
    record = {"kind": "bench", "model": name, **run_bench(setup, rounds=rounds, device=str(device), dtype=dtype,
                                                          train_memory=False)}
    record.update(_inference_memory(model, cast(setup.batch), setup, device))
    train_bs = min(batch_size, train_batch_size)
    record["train_batch_size"] = train_bs
    attach = lambda m: apply(m, adapter=setup.adapter, config=setup.config)  # noqa: E731
    try:
        dense = measure_train_step_memory(model, cast(make_batch(train_bs)), None, device=device)
        reduced = measure_train_step_memory(model, cast(make_batch(train_bs)), attach, device=device)
        record.update(dense_train_peak_memory_mib=dense.peak_memory_mib, reduced_train_peak_memory_mib=reduced.peak_memory_mib,
                      train_memory_saved_fraction=1.0 - reduced.peak_memory_mib / dense.peak_memory_mib)
    except torch.OutOfMemoryError as err:
        record["train_memory_error"] = f"out of memory at batch {train_bs}: {str(err).splitlines()[0]}"
    model.eval()
    del model, setup
    torch.cuda.empty_cache()
    record["seconds"] = time.perf_counter() - start
    return record


def _inference_memory(model: torch.nn.Module, batch: dict, setup: Any, device: torch.device) -> dict[str, Any]:
    from pumer_plug.evaluation.measure import measure_peak_memory
    from pumer_plug.handle import apply

    attach = lambda m: apply(m, adapter=setup.adapter, config=setup.config)  # noqa: E731
    dense, reduced = measure_peak_memory(model, batch, None, device), measure_peak_memory(model, batch, attach, device)
    return {"dense_peak_memory_mib": dense.peak_memory_mib, "reduced_peak_memory_mib": reduced.peak_memory_mib,
            "memory_method": dense.memory_method}


def markdown_table(records: Sequence[dict[str, Any]]) -> str:
    """The bench records as a markdown table (``TABLE`` columns), the test record as a line."""
    lines = []
    for r in records:
        if r["kind"] == "gpu-tests":
            lines.append(f"gpu-marked tests: {r.get('skipped') or r['summary']} (exit code {r.get('returncode', '-')})\n")
    lines.append("| " + " | ".join(title for title, _ in TABLE) + " |")
    lines.append("|" + "---|" * len(TABLE))
    for r in records:
        if r["kind"] == "bench":
            lines.append("| " + " | ".join(_cell(r.get(key)) for _, key in TABLE) + " |")
    devices = {r.get("device_name") or r.get("device") for r in records if r["kind"] == "bench"}
    lines.append(f"\ndevice: {', '.join(str(d) for d in devices)}")
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def run_gpu_check(output: str | Path, models: Sequence[str] = MODELS, dtype: str = "float16", rounds: int = 3,
                  max_batch_size: int = 1024, train_batch_size: int = 32, tests: bool = True,
                  device: str = "cuda") -> list[dict[str, Any]]:
    """Runs the GPU tests and the measurements; writes ``gpu-check.jsonl`` and ``gpu-check.md``.

    Raises:
        UserError: no CUDA device.
    """
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        raise UserError(f"gpu-check needs a CUDA device, got {device} (CUDA available: {torch.cuda.is_available()})")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    records = [run_gpu_tests(out)] if tests else []
    for name in models:
        try:
            records.append(measure_model(name, dev, dtype, rounds, max_batch_size, train_batch_size))
        except Exception as err:  # one model failing must not lose the others' figures
            records.append({"kind": "bench", "model": name, "benchmark": name, "error": f"{type(err).__name__}: {err}"})
        with open(out / "gpu-check.jsonl", "w") as f:  # rewritten after every model: partial runs keep what they measured
            f.writelines(json.dumps(r) + "\n" for r in records)
    (out / "gpu-check.md").write_text(markdown_table(records))
    return records
