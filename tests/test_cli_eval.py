"""CLI defects of issue 11: --find-batch-size, bench --device/--dtype, user errors vs bugs, the cache folder."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import ViltConfig, ViltForQuestionAnswering

from pumer_plug import PumerConfig
from pumer_plug.cli import main
from pumer_plug.errors import UserError
from pumer_plug.evaluation.studies.bench import BenchSetup
from pumer_plug.registry import BENCH_MODELS

TINY_BENCH = "tiny-vilt-test"


def tiny_vilt_bench(batch_size: int = 2) -> BenchSetup:
    torch.manual_seed(0)
    config = ViltConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        image_size=64, patch_size=16, max_position_embeddings=16, num_labels=3, vocab_size=50)
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(5, 50, (batch_size, 8), generator=g),
             "attention_mask": torch.ones(batch_size, 8, dtype=torch.long),
             "pixel_values": torch.randn(batch_size, 3, 64, 64, generator=g)}
    pumer = PumerConfig(reduction_layers=(0, 1), prune_ratio=0.2, image_merge_ratio=0.3, text_merge_ratio=0.2)
    return BenchSetup(ViltForQuestionAnswering(config).eval(), batch, "vilt", pumer, "tiny ViLT")


if TINY_BENCH not in BENCH_MODELS:
    BENCH_MODELS.register(TINY_BENCH)(tiny_vilt_bench)


def test_find_batch_size_on_cpu_is_one_line_naming_the_need_for_cuda(capsys):
    assert main(["compare", "--find-batch-size", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--find-batch-size needs a CUDA device" in err


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bench_runs_in_the_requested_dtype_and_records_device_and_dtype(dtype, tmp_path, capsys):
    output = tmp_path / "out"
    argv = ["bench", "--model", TINY_BENCH, "--rounds", "1", "--device", "cpu", "--dtype", dtype, "--output", str(output)]
    assert main(argv) == 0
    result = json.loads((output / "bench.jsonl").read_text())
    assert result["device"] == "cpu" and result["dtype"] == dtype
    assert result["reduced_gflops_per_example"] < result["dense_gflops_per_example"]
    out = capsys.readouterr().out.splitlines()
    assert f"dtype {dtype}" in [" ".join(line.split()) for line in out]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bench_honours_a_cuda_device(tmp_path):
    output = tmp_path / "out"
    assert main(["bench", "--model", TINY_BENCH, "--rounds", "1", "--device", "cuda", "--dtype", "float16",
                 "--output", str(output)]) == 0
    result = json.loads((output / "bench.jsonl").read_text())
    assert result["device"].startswith("cuda") and result["dtype"] == "float16" and result["cuda_version"]


def test_unknown_bench_model_and_bad_dtype_are_one_line(capsys):
    assert main(["bench", "--model", "nosuch"]) == 2
    assert "unknown bench model 'nosuch'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["bench", "--dtype", "float8"])
    assert info.value.code == 2 and "--dtype" in capsys.readouterr().err


def test_user_errors_are_one_line_but_internal_errors_keep_their_traceback(monkeypatch, capsys):
    from pumer_plug import cli

    def user_mistake(args):
        raise UserError("the thing you asked for is wrong")

    def internal_bug(args):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(cli, "cmd_list", user_mistake)
    assert cli.main(["list"]) == 2
    assert capsys.readouterr().err == "pumer-plug: error: the thing you asked for is wrong\n"
    monkeypatch.setattr(cli, "cmd_list", internal_bug)
    with pytest.raises(ValueError, match="internal invariant"):
        cli.main(["list"])


@pytest.mark.parametrize("call, expected", [
    (lambda: __import__("pumer_plug").METHODS.get("nosuch"), "unknown method 'nosuch'"),
    (lambda: PumerConfig.preset("nosuch"), "unknown PuMer preset"),
    (lambda: PumerConfig(prune_ratio=1.5), "PumerConfig.prune_ratio"),
    (lambda: __import__("pumer_plug.evaluation.tasks", fromlist=["get_task"]).get_task("nosuch"), "unknown task"),
    (lambda: __import__("pumer_plug.evaluation.tasks", fromlist=["load_config"]).load_config("tome", {"r": -1}), "r"),
    (lambda: __import__("pumer_plug").apply(torch.nn.Linear(2, 2), adapter="vilt"), "vilt"),
])
def test_user_facing_errors_are_user_errors(call, expected):
    with pytest.raises(UserError, match=expected):
        call()


def test_cache_folder_is_the_platform_user_cache_unless_overridden(monkeypatch, tmp_path):
    from pumer_plug.evaluation.tasks import builtin

    monkeypatch.delenv(builtin.CACHE_ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert builtin.builtin_model_dir() == tmp_path / "xdg" / "pumer-plug" / builtin.BUILTIN_NAME
    monkeypatch.setenv(builtin.CACHE_ENV_VAR, str(tmp_path / "override"))
    assert builtin.builtin_model_dir() == tmp_path / "override" / builtin.BUILTIN_NAME


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_find_batch_size_returns_the_largest_batch_that_fits_on_cuda():
    from pumer_plug.evaluation.measure import batch_size as search

    per_example = torch.cuda.mem_get_info()[0] // 10  # about 9 examples fit

    class Hungry(torch.nn.Module):
        def forward(self, x):
            scratch = torch.empty(x.shape[0], per_example, dtype=torch.uint8, device=x.device)
            return x + scratch[:, :1]

    model = Hungry()
    make_batch = lambda bs: {"x": torch.zeros(bs, 1, dtype=torch.uint8)}  # noqa: E731
    found = search.find_batch_size(model, make_batch, device="cuda", max_batch_size=64)
    fits = search._oom_probe(model, make_batch, None, torch.device("cuda"))
    assert 5 <= found < 10 and fits(found) and not fits(found + 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compare_finds_the_batch_size_and_runs_in_half_precision_on_cuda():
    from pumer_plug.evaluation.studies.compare import MethodSpec, run_compare
    from tests.test_finetune import TinyTask

    task = TinyTask()
    rows = run_compare(task, [MethodSpec("pumer", task.default_config("pumer"))], batch_size=None, device="cuda",
                       rounds=1, timing_batches=1, progress=False, dtype="float16")
    assert rows[0]["batch_size"] >= 16 and rows[0]["dtype"] == "float16" and rows[0]["device"].startswith("cuda")
