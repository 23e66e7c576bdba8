"""Behaviour tests for evaluation.measure and evaluation.report on tiny plain nn.Module models.

No speed claims: timing is checked through an injected clock, never by wall time.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pumer_plug.evaluation import measure
from pumer_plug.evaluation.measure import batch_size as batch_size_search
from pumer_plug.evaluation.studies import report
from pumer_plug.evaluation.measure import Variant

DIM, HEADS, FEATURES = 32, 2, 8


class Block(nn.Module):
    """Pre-norm attention + MLP block on (B, N, C)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(B, N, 3, HEADS, C // HEADS)  # (B, N, 3, H, C/H)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, N, C/H)
        attn = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, C/H)
        x = x + self.proj(attn.transpose(1, 2).reshape(B, N, C))  # (B, N, C)
        return x + self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    def __init__(self, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(FEATURES, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(depth))
        self.head = nn.Linear(DIM, 3)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.embed(features)  # (B, N, C)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=1))


class Handle:
    """Handle-like object: remove() is idempotent and it works as a context manager."""

    def __init__(self, hook_handle) -> None:
        self._hook = hook_handle

    def remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def truncate_half(model: nn.Module) -> Handle:
    """Attach: a pre-hook on the first block keeps only the first half of the tokens."""

    def hook(module, args):
        x = args[0]
        return (x[:, : x.shape[1] // 2],)  # (B, N // 2, C)

    return Handle(model.blocks[0].register_forward_pre_hook(hook))


def batch(batch_size: int = 2, tokens: int = 16) -> dict[str, torch.Tensor]:
    return {"features": torch.randn(batch_size, tokens, FEATURES)}


@pytest.fixture
def model() -> TinyTransformer:
    torch.manual_seed(0)
    return TinyTransformer()


class StepClock:
    """Fake clock: each call advances by the next step (cycled)."""

    def __init__(self, steps: list[float]) -> None:
        self.steps, self.calls, self.now = steps, 0, 0.0

    def __call__(self) -> float:
        self.now += self.steps[self.calls % len(self.steps)]
        self.calls += 1
        return self.now


# ---------------------------------------------------------------- throughput


def truncate_to(divisor: int):
    """Returns an attach that keeps the first 1/divisor of the tokens (spy-free variant id)."""

    def attach(model: nn.Module) -> torch.utils.hooks.RemovableHandle:
        hook = lambda module, args: (args[0][:, : args[0].shape[1] // divisor],)  # noqa: E731
        return model.blocks[0].register_forward_pre_hook(hook)

    return attach


def test_variants_interleave_round_robin_and_warmup_is_dropped(model):
    seen_tokens: list[int] = []  # tokens reaching block 0 identify the active variant
    model.blocks[0].register_forward_hook(lambda m, args, out: seen_tokens.append(out.shape[1]))
    variants = [Variant("dense", "-", None), Variant("half", "keep=1/2", truncate_to(2)),
                Variant("quarter", "keep=1/4", truncate_to(4))]
    results = measure.measure_throughput(model, [batch(2, 16), batch(2, 16)], variants,
                                         rounds=2, warmup=1)

    one_round = [16, 16, 8, 8, 4, 4]  # each variant runs both batches, then the next variant
    assert seen_tokens == one_round * 3  # 1 warm-up + 2 measured rounds
    assert [r.rounds for r in results.values()] == [2, 2, 2]
    assert all(len(r.throughput_per_s_rounds) == 2 for r in results.values())
    assert len(model.blocks[0]._forward_pre_hooks) == 0  # every attach was removed


def test_attach_returning_remove_only_handle_is_removed(model):
    log: list = []

    class RemoveOnly:
        def __init__(self, hook_handle):
            self.hook_handle = hook_handle

        def remove(self):
            log.append("remove")
            self.hook_handle.remove()

    attach = lambda m: RemoveOnly(truncate_to(2)(m))  # noqa: E731
    measure.measure_throughput(model, [batch()], [Variant("x", "-", attach)], rounds=2, warmup=0)
    assert log == ["remove", "remove"]
    assert len(model.blocks[0]._forward_pre_hooks) == 0


def test_throughput_uses_measured_rounds_only_and_median(model):
    # Per variant pass the clock is read twice: start, end. Warm-up pass takes 100 s,
    # measured passes take 1 s, 3 s, 2 s -> median 2 s.
    clock = StepClock([0.0, 100.0, 0.0, 1.0, 0.0, 3.0, 0.0, 2.0])
    batches = [batch(4), batch(4), batch(2)]
    results = measure.measure_throughput(model, batches, [Variant("dense", "-")], rounds=3,
                                         warmup=1, clock=clock)
    r = results["dense"]
    assert r.examples_per_round == 10 and r.batches_per_round == 3
    assert r.throughput_per_s_rounds == pytest.approx((10.0, 10 / 3, 5.0))
    assert r.throughput_per_s == pytest.approx(5.0)
    assert r.latency_ms_rounds == pytest.approx((1000 / 3, 1000.0, 2000 / 3))
    assert r.latency_ms == pytest.approx(2000 / 3)
    assert (r.name, r.config, r.warmup) == ("dense", "-", 1)


def test_throughput_fields_are_sane_with_real_clock_and_model_state_restored(model):
    model.train()
    variants = [Variant("dense", "-"), Variant("half", "keep=0.5", truncate_half)]
    results = measure.measure_throughput(model, [batch()], variants, rounds=2, warmup=1)
    assert list(results) == ["dense", "half"]
    for r in results.values():
        assert r.throughput_per_s > 0 and r.latency_ms > 0
        assert all(v > 0 for v in r.throughput_per_s_rounds)
    assert model.training
    assert not model.blocks[0]._forward_pre_hooks  # every attach was removed


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batches": []}, "batches is empty"),
        ({"variants": []}, "variants is empty"),
        ({"rounds": 0}, "rounds must be >= 1"),
        ({"warmup": -1}, "warmup must be >= 0"),
        ({"variants": [Variant("x", "-"), Variant("x", "-")]}, "repeated"),
        ({"batches": [{"flag": True}]}, "no tensor"),
    ],
)
def test_throughput_bad_input_raises(model, kwargs, message):
    args = {"batches": [batch()], "variants": [Variant("dense", "-")], "rounds": 1, "warmup": 0}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        measure.measure_throughput(model, **args)


# ---------------------------------------------------------------- FLOPs


def test_flops_of_a_linear_match_hand_count():
    layer = nn.Linear(16, 8)

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(x)

    gflops = measure.measure_flops(Wrapper(), {"x": torch.randn(4, 10, 16)})
    assert gflops == pytest.approx(2 * 10 * 16 * 8 / 1e9)  # per example: 2 * N * C_in * C_out


def test_truncating_variant_has_fewer_flops_and_module_breakdown(model):
    b = batch(2, 16)
    dense = measure.measure_flops(model, b)
    half = measure.measure_flops(model, b, truncate_half)
    assert 0 < half < dense
    by_module = measure.measure_flops_by_module(model, b, truncate_half)
    assert by_module["Global"] == pytest.approx(half)
    embed = next(v for k, v in by_module.items() if k.endswith(".embed"))
    assert embed == pytest.approx(2 * 16 * FEATURES * DIM / 1e9)  # embed runs before truncation
    assert not model.blocks[0]._forward_pre_hooks


# ---------------------------------------------------------------- memory


def test_peak_memory_grows_with_sequence_length_and_batch_size(model):
    by_tokens = [measure.measure_peak_memory(model, batch(2, n)) for n in (8, 32, 128)]
    by_batch = [measure.measure_peak_memory(model, batch(b, 32)) for b in (1, 4, 16)]
    for results in (by_tokens, by_batch):
        activations = [r.activation_memory_mib for r in results]
        assert activations[0] < activations[1] < activations[2]
        assert all(r.peak_memory_mib > r.weights_memory_mib for r in results)
    assert by_tokens[0].memory_method == measure.CPU_MEMORY_METHOD
    assert measure.CPU_MEMORY_METHOD in measure.MEMORY_METHODS


def test_peak_memory_is_deterministic_and_counts_weights(model):
    b = batch(3, 24)
    first = measure.measure_peak_memory(model, b)
    second = measure.measure_peak_memory(model, b)
    assert first == second
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert first.weights_memory_mib == pytest.approx(weight_bytes / 2**20)


def test_truncating_variant_uses_less_memory(model):
    b = batch(4, 64)
    dense = measure.measure_peak_memory(model, b)
    half = measure.measure_peak_memory(model, b, truncate_half)
    assert half.peak_memory_mib < dense.peak_memory_mib
    assert half.activation_memory_mib < dense.activation_memory_mib


def test_live_storage_tracker_counts_new_storages_not_views():
    with measure.LiveStorageTracker() as tracker:
        a = torch.zeros(1000)  # 4000 B
        b = a * 2  # 4000 B more
        c = b.view(10, 100)  # view: nothing new
        a.add_(1)  # in place: nothing new
        assert tracker.live_bytes == 8000
        del a
        assert tracker.live_bytes == 4000
        del b, c
        assert tracker.live_bytes == 0
    assert tracker.peak_bytes == 8000


# ---------------------------------------------------------------- batch size search


def test_search_batch_size_doubles_then_bisects():
    probes: list[int] = []

    def fits(bs):
        probes.append(bs)
        return bs <= 37

    assert measure.search_batch_size(fits, start=4, max_batch_size=1024) == 37
    assert probes[:5] == [4, 8, 16, 32, 64]
    assert measure.search_batch_size(lambda bs: True, start=3, max_batch_size=50) == 50
    with pytest.raises(ValueError, match="does not fit"):
        measure.search_batch_size(lambda bs: False, start=2)


def test_oom_probe_reports_out_of_memory_as_not_fitting():
    class Hungry(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(2, 2)

        def forward(self, x):
            if x.shape[0] > 5:
                raise torch.OutOfMemoryError("fake OOM")
            return self.layer(x)

    fits = batch_size_search._oom_probe(Hungry(), lambda bs: {"x": torch.randn(bs, 2)}, None,
                              torch.device("cpu"))
    assert measure.search_batch_size(fits, start=1, max_batch_size=64) == 5


def test_find_batch_size_refuses_cpu(model):
    with pytest.raises(ValueError, match="CUDA"):
        measure.find_batch_size(model, lambda bs: batch(bs))


# ---------------------------------------------------------------- environment and report


def test_environment_record_fields():
    env = measure.environment_record("cpu", torch.float32, 8, num_threads=2,
                                     attention_kernel="sdpa")
    assert env["device"] == "cpu" and env["dtype"] == "float32"
    assert env["batch_size"] == 8 and env["num_threads"] == 2
    assert env["attention_kernel"] == "sdpa" and env["torch_version"] == torch.__version__
    for key in ("device_name", "transformers_version", "python_version", "cpu_model",
                "timestamp"):
        assert env[key]


def _rows():
    variants = [Variant("dense", "-"), Variant("pumer", "prune=0.1 merge=0.3")]
    tput = {"dense": 100.0, "pumer": 187.0}
    mem = {"dense": measure.MemoryResult(200.0, 150.0, 50.0, measure.CPU_MEMORY_METHOD),
           "pumer": measure.MemoryResult(100.0, 50.0, 50.0, measure.CPU_MEMORY_METHOD)}
    env = measure.environment_record("cpu", torch.float32, 8, attention_kernel="sdpa")
    return report.compare_rows(variants, environment=env, accuracy={"dense": 0.9, "pumer": 0.885},
                               throughput=tput, memory=mem, gflops={"dense": 4.0, "pumer": 2.0})


def test_compare_rows_ratios_are_relative_to_dense():
    dense, pumer = _rows()
    assert dense["throughput_increase"] == pytest.approx(1.0)
    assert pumer["throughput_increase"] == pytest.approx(1.87)
    assert pumer["memory_reduction"] == pytest.approx(2.0)
    assert pumer["accuracy_change_points"] == pytest.approx(-1.5)
    assert dense["accuracy_change_points"] == pytest.approx(0.0)
    assert pumer["gflops_per_example"] == 2.0 and pumer["memory_method"] == measure.CPU_MEMORY_METHOD


def test_compare_rows_accepts_throughput_results(model):
    variants = [Variant("dense", "-"), Variant("half", "keep=0.5", truncate_half)]
    tput = measure.measure_throughput(model, [batch()], variants, rounds=1, warmup=0)
    env = measure.environment_record("cpu", torch.float32, 2)
    rows = report.compare_rows(variants, environment=env, throughput=tput)
    assert rows[1]["throughput_per_s"] == tput["half"].throughput_per_s
    assert rows[1]["latency_ms"] == tput["half"].latency_ms
    assert rows[1]["accuracy"] is None and rows[1]["peak_memory_mib"] is None


def test_table_has_exactly_the_listed_columns():
    table = report.format_table(_rows())
    header = [cell.strip() for cell in table.splitlines()[0].strip("|").split("|")]
    assert header == ["method", "config", "acc", "Δacc", "ex/s", "speed-up", "mem MiB", "GFLOPs"]
    assert "1.87x" in table and "-1.50" in table and "2.00x" in report.format_table(_rows(), wide=True)
    assert "torch_version" not in table


def test_write_results_appends_jsonl_with_environment_and_writes_markdown(tmp_path):
    rows = _rows()
    paths = report.write_results(rows, tmp_path / "out")
    report.write_results(rows, tmp_path / "out")
    lines = paths["jsonl"].read_text().splitlines()
    assert len(lines) == 4
    for line in lines:
        row = json.loads(line)
        for key in ("device", "device_name", "dtype", "batch_size", "num_threads",
                    "attention_kernel", "torch_version", "transformers_version",
                    "python_version", "cpu_model", "timestamp"):
            assert key in row
    markdown = paths["markdown"].read_text()
    assert "| method" in markdown and "torch_version" in markdown
    assert measure.CPU_MEMORY_METHOD in markdown


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"baseline": "nope"}, "baseline variant 'nope'"),
        ({"gflops": {"dense": 1.0}}, "no GFLOPs for variant 'pumer'"),
        ({"accuracy": {"dense": 90.0, "pumer": 0.5}}, r"fraction in \[0, 1\]"),
    ],
)
def test_compare_rows_bad_input_raises(kwargs, message):
    variants = [Variant("dense", "-"), Variant("pumer", "-")]
    with pytest.raises(ValueError, match=message):
        report.compare_rows(variants, environment={}, **kwargs)


def test_write_results_names_the_task_reference_accuracies(tmp_path):
    references = {"majority answer": 0.18, "question-only prior": 0.303}
    paths = report.write_results(_rows(), tmp_path, references)
    assert "Reference points on the same examples: majority answer 18.0%, question-only prior 30.3%." \
        in paths["markdown"].read_text()
    assert "Reference points" not in report.write_results(_rows(), tmp_path / "plain")["markdown"].read_text()


def test_write_results_rejects_empty_rows(tmp_path):
    with pytest.raises(ValueError, match="no rows"):
        report.write_results([], tmp_path)
