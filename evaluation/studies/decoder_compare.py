"""``pumer-plug compare`` on a generative decoder-VLM task (``Task.generates``; e.g. ``builtin-llava``).

Accuracy comes from greedy generation over the test split with each method attached. Cost is what
a decoder VLM is judged by (as in ``pumer-plug bench --model llava-cpu``): time to first token (the
prefill, vision tower included), decode tokens/s with the KV cache, KV-cache MiB after the prefill
and prefill GFLOPs (``FlopCounterMode``, sdpa counted by its math backend). Timing: one test prompt
(batch size 1), eval and inference mode, variants interleaved round-robin in one process, warm-up
dropped, medians; every ratio is against the dense row of the same run.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from tabulate import tabulate
from tqdm.auto import tqdm

from pumer_plug.evaluation.decoder_bench import kv_cache_bytes
from pumer_plug.evaluation.measure import attached, attention_kernel, environment_record
from pumer_plug.evaluation.parallel import Processes
from pumer_plug.evaluation.studies.compare import MethodSpec, make_variants
from pumer_plug.evaluation.studies.report import below_references, format_references
from pumer_plug.evaluation.tasks.base import Task, check_methods_fit

# Printed header -> row key, in the printed order (the table stays within 120 columns).
COLUMNS = {"method": "method", "config": "config", "kept": "image_tokens_kept", "acc %": "accuracy",
           "change": "accuracy_change_points", "TTFT ms": "ttft_ms", "TTFT x": "ttft_speedup",
           "tok/s": "decode_tokens_per_s", "KV MiB": "kv_cache_mib", "GFLOPs": "prefill_gflops",
           "FLOPs %": "flops_percent"}


def _kept_image_tokens(cache: Any, prompt_tokens: int, image_tokens: int) -> int:
    """Image tokens the last decoder layer cached (its cache length less the prompt's text tokens)."""
    return cache.layers[-1].keys.shape[-2] - (prompt_tokens - image_tokens)


def _greedy(logits: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """The next token of every row, never the image token (a decode step must not hold one).

    Shapes:
        logits (B, 1, vocab) -> (B, 1)
    """
    logits = logits[:, -1].clone()
    logits[:, image_token_id] = float("-inf")
    return logits.argmax(-1, keepdim=True)


def _prefill_and_decode(model: torch.nn.Module, inputs: dict, new_tokens: int) -> tuple[float, float]:
    """Seconds of the prefill (time to first token) and of ``new_tokens`` decode steps with the KV cache."""
    image = model.config.image_token_id
    start = time.perf_counter()
    out = model(**inputs, use_cache=True, logits_to_keep=1)
    token = _greedy(out.logits, image)
    prefill_s = time.perf_counter() - start
    mask, cache = inputs["attention_mask"], out.cache
    start = time.perf_counter()
    for _ in range(new_tokens):
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        out = model(input_ids=token, attention_mask=mask, cache=cache, use_cache=True)
        token = _greedy(out.logits, image)
    return prefill_s, time.perf_counter() - start


def run_decoder_compare(task: Task, specs: Sequence[MethodSpec], batch_size: int = 32, rounds: int = 5,
                        new_tokens: int = 8, progress: bool = True) -> list[dict[str, Any]]:
    """Accuracy, time to first token, decode tokens/s, KV-cache MiB and prefill GFLOPs per variant (CPU, float32).

    Raises:
        UserError: a method's config does not fit the model or the task's image tokens (before any pass).

    Returns:
        One row per variant (dense first): the ``COLUMNS`` keys and the environment record; ``[]``
        on a process other than the main one under ``accelerate launch``.
    """
    procs = Processes.current("cpu")  # under accelerate launch: every process scores its share of the batches
    model = task.load_model(torch.device("cpu")).eval()
    inputs, _ = next(iter(task.batches("test", 1, 1)))  # the timed prompt
    image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    check_methods_fit(model, task.adapter, [(s.method, s.config) for s in specs], image_tokens)
    variants = make_variants(task, specs)
    accuracy = {}
    test = procs.shard(task.batches("test", batch_size))
    for variant in tqdm(variants, desc="accuracy", disable=not (progress and procs.is_main)):
        with attached(model, variant.attach):
            accuracy[variant.name] = procs.accuracy(task, model, test)
    if not procs.is_main:  # timing: the main process alone
        return []
    prompt_tokens = inputs["input_ids"].shape[1]
    ttft = {v.name: [] for v in variants}
    decode = {v.name: [] for v in variants}
    kv, gflops, kept = {}, {}, {}
    with torch.inference_mode():
        for v in variants:  # FLOPs, KV bytes and kept tokens: one counted prefill each
            with attached(model, v.attach), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
                out = model(**inputs, use_cache=True, logits_to_keep=1)
            gflops[v.name], kv[v.name] = counter.get_total_flops() / 1e9, kv_cache_bytes(out.cache) / 2**20
            kept[v.name] = _kept_image_tokens(out.cache, prompt_tokens, image_tokens)
        for r in tqdm(range(1 + rounds), desc="timing", disable=not progress):
            for v in variants:
                with attached(model, v.attach):
                    seconds, steps = _prefill_and_decode(model, inputs, new_tokens)
                if r:  # round 0 is the warm-up
                    ttft[v.name].append(seconds)
                    decode[v.name].append(new_tokens / steps)
    env = environment_record(torch.device("cpu"), torch.float32, 1, torch.get_num_threads(), attention_kernel(model))
    env.update(task=task.name, metric=task.metric, test_batch_size=batch_size, rounds=rounds,
               new_tokens=new_tokens, prompt_tokens=prompt_tokens, load_average_1min=os.getloadavg()[0])
    dense = variants[0].name
    rows = []
    for v in variants:
        t = statistics.median(ttft[v.name])
        rows.append({"method": v.name, "config": v.config, "image_tokens_kept": kept[v.name],
                     "accuracy": accuracy[v.name],
                     "accuracy_change_points": 100 * (accuracy[v.name] - accuracy[dense]),
                     "ttft_ms": 1e3 * t, "ttft_speedup": statistics.median(ttft[dense]) / t,
                     "ttft_ms_rounds": [1e3 * s for s in ttft[v.name]],
                     "decode_tokens_per_s": statistics.median(decode[v.name]),
                     "decode_speedup": statistics.median(decode[v.name]) / statistics.median(decode[dense]),
                     "kv_cache_mib": kv[v.name], "prefill_gflops": gflops[v.name],
                     "flops_percent": 100 * gflops[v.name] / gflops[dense], **env})
    return rows


#: how each column's value is printed (accuracy and its change in points, ratios as "x")
_FORMATS = {"accuracy_change_points": "{:+.1f}", "ttft_ms": "{:.1f}", "ttft_speedup": "{:.2f}x",
            "decode_tokens_per_s": "{:.0f}", "kv_cache_mib": "{:.2f}", "prefill_gflops": "{:.3f}",
            "flops_percent": "{:.1f}"}
#: row keys that are measurements; every other key of a row is its environment (results.md)
_MEASURED = {*COLUMNS.values(), "ttft_ms_rounds", "decode_speedup"}


def format_decoder_table(rows: Sequence[dict[str, Any]], references: Mapping[str, float] | None = None,
                         wide: bool = False) -> str:
    """The table of decoder rows (``tok/s``: decode tokens/s): plain text within 120 columns, config
    descriptions cut; ``wide``: a markdown table with the full configs (``results.md``).
    An accuracy below the highest of ``references`` (trivial predictors) is marked ``!``, as in
    :func:`~pumer_plug.evaluation.studies.report.format_table`."""
    flagged = set(below_references(rows, references))

    def cell(key: str, row: dict[str, Any]) -> str:
        value = row[key]
        if key == "accuracy":
            return f"{100 * value:.1f}" + (" !" if row["method"] in flagged else "")
        if key == "config" and not wide:
            value = value.replace("layers=", "L=")
            return value if len(value) <= 24 else value[:23] + "~"
        return _FORMATS[key].format(value) if key in _FORMATS else str(value)

    body = [[cell(k, row) for k in COLUMNS.values()] for row in rows]
    if wide:
        return tabulate(body, headers=list(COLUMNS), tablefmt="github", disable_numparse=True)
    table = [list(COLUMNS)] + body
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip()
             for line in table]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def write_decoder_results(rows: Sequence[dict[str, Any]], output: str | Path,
                          references: dict[str, float] | None = None) -> dict[str, Path]:
    """Appends the rows to ``results.jsonl`` and rewrites ``results.md`` in ``output`` (this call's
    rows with their full configs, the reference accuracies and the environment)."""
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    jsonl, markdown = folder / "results.jsonl", folder / "results.md"
    with jsonl.open("a") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    lines = ["# Results", "", format_decoder_table(rows, references, wide=True), "",
             "acc %: accuracy on the test split; change: points against dense; TTFT: time to first token (the "
             "prefill, vision tower included, batch size 1); tok/s: decode tokens/s with the KV cache; KV MiB: "
             "the cache after the prefill; GFLOPs: the prefill's. Ratios against the dense row of the same run."]
    if references:
        line = format_references(references, rows)
        lines += ["", line[0].upper() + line[1:] + "."]
    lines += ["", "## Environment", ""]
    lines += [f"- {key}: {value}" for key, value in rows[0].items() if key not in _MEASURED]
    markdown.write_text("\n".join(lines) + "\n")
    return {"jsonl": jsonl, "markdown": markdown}
