"""``pumer-plug gpu-check``: refuses without CUDA in one line; tables; on a GPU, a tiny end-to-end run."""
from __future__ import annotations

import json

import pytest
import torch

from pumer_plug.cli import main
from pumer_plug.evaluation.studies.gpu_check import markdown_table, repo_tests, run_gpu_check
from tests.test_cli_eval import TINY_BENCH


def test_gpu_check_without_cuda_is_one_line(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert main(["gpu-check", "--output", "unused"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gpu-check needs a CUDA device" in err


def test_the_checkout_tests_are_found():
    assert repo_tests() is not None and (repo_tests() / "test_gpu_check.py").exists()


def test_markdown_table_has_one_row_per_model_and_the_test_summary():
    records = [{"kind": "gpu-tests", "returncode": 0, "summary": "12 passed"},
               {"kind": "bench", "benchmark": "ViLT", "batch_size": 512, "throughput_increase": 1.9,
                "train_memory_saved_fraction": 0.45, "device_name": "H200"},
               {"kind": "bench", "benchmark": "METER", "error": "boom"}]
    table = markdown_table(records)
    assert "12 passed" in table and "| ViLT | 512 |" in table and "| METER |" in table and "H200" in table


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_check_measures_a_tiny_model_on_cuda(tmp_path):
    records = run_gpu_check(tmp_path, models=[TINY_BENCH], rounds=1, max_batch_size=8, train_batch_size=4, tests=False)
    (record,) = records
    assert "error" not in record, record.get("error")
    assert record["batch_size"] == 8 and record["dense_train_peak_memory_mib"] > 0
    lines = (tmp_path / "gpu-check.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["model"] == TINY_BENCH and (tmp_path / "gpu-check.md").exists()
