"""``pumer-plug bench --model llava-cpu``: the decoder bench runs through the CLI and writes JSON lines."""
from __future__ import annotations

import functools
import json

import pytest

from pumer_plug.cli import main
from pumer_plug.errors import UserError
from pumer_plug.evaluation.decoder_bench import llava_cpu
from pumer_plug.registry import BENCH_MODELS

TINY = {"text_hidden": 32, "text_layers": 3, "text_heads": 2, "text_intermediate": 64, "vocab": 32064,
        "vision_hidden": 32, "vision_layers": 1, "text_after": 8, "new_tokens": 2, "warmup": 0}


@pytest.fixture
def tiny_llava_cpu(monkeypatch):
    monkeypatch.setitem(BENCH_MODELS._entries, "llava-cpu", functools.partial(llava_cpu, **TINY))


def test_bench_llava_cpu_prints_and_writes_rows_of_dense_and_the_method(tiny_llava_cpu, tmp_path, capsys):
    out = tmp_path / "bench"  # --output is a folder, as for every command
    assert main(["bench", "--model", "llava-cpu", "--method", "fastv", "--rounds", "1", "--output", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["dense", "fastv-keep192", "fastv-keep128", "fastv-keep64"]
    assert all(r["flops_ratio"] < 1 and r["kv_cache_mib"] < rows[0]["kv_cache_mib"] for r in rows[1:])
    assert {"ttft_ms", "decode_tokens_per_s", "prefill_gflops", "torch", "load_average_1min"} <= rows[0].keys()
    assert "fastv-keep64" in capsys.readouterr().out


def test_bench_llava_cpu_is_listed_and_refuses_unknown_methods(tiny_llava_cpu, capsys):
    assert main(["list"]) == 0
    assert "llava-cpu" in capsys.readouterr().out
    with pytest.raises(UserError, match="no variants of method 'tome'"):
        BENCH_MODELS.get("llava-cpu")().runner("tome", 1)
    with pytest.raises(UserError, match="batch size 1"):
        BENCH_MODELS.get("llava-cpu")(batch_size=4)
