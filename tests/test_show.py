"""Source tracing (composed plans) and ``pumer-plug show``: every patch accounted for once per layer,
drawn counts equal ``handle.token_counts``, outputs unchanged with tracing on."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import pumer_plug
from pumer_plug.evaluation.studies.show import draw_example, run_show, trace_example
from pumer_plug.evaluation.tasks import Predictions, Task
from pumer_plug.ops.sources import patch_groups, token_groups, trace_sources
from tests.backbones import BACKBONES, METHOD_CONFIGS
from tests.test_finetune import TinyTask

METHODS = ("pumer", "tome", "dynamicvit", "smres")


def one_row(backbone: str) -> dict:
    batch = BACKBONES[backbone].make_batch()
    return BACKBONES[backbone].split(batch)[0]


def traced(backbone: str, method: str):
    spec = BACKBONES[backbone]
    model = spec.build()
    config = METHOD_CONFIGS[method][0](spec.num_layers, spec.modalities)
    handle = pumer_plug.apply(model, adapter=spec.adapter, method=method, config=config)
    trace = trace_sources(handle)
    out = spec.logits(model(**one_row(backbone)))
    return model, handle, trace, out


@pytest.mark.parametrize("backbone, method", [(b, m) for b in ("vilt", "meter", "bridgetower") for m in METHODS]
                         + [("timm-vit", "tome"), ("timm-vit", "dynamicvit")])
def test_every_patch_is_kept_merged_or_pruned_exactly_once_and_counts_match(backbone, method):
    model, handle, trace, _ = traced(backbone, method)
    layout = handle.adapter.token_layout(trace.inputs)
    rows, cols = layout.grid
    num_patches = rows * cols
    num_tokens = layout.image_start + num_patches
    counts = handle.token_counts
    assert sorted(trace.plans) == sorted(counts) and counts
    dests = [plans[layout.image_stream].dest for plans in trace.plans.values() if layout.image_stream in plans]
    assert all(d.shape[1] == num_tokens for d in dests if d is not None)  # the layout spans the whole stream
    shrank = False
    for layer, count in counts.items():
        slots, discard = trace.slots(layer, layout.image_stream, num_tokens)
        groups = patch_groups(slots[0], layout.image_start, num_patches, discard)
        members = groups.kept + [p for g in groups.merged for p in g] + groups.pruned
        assert sorted(members) == list(range(num_patches))  # each patch exactly once
        assert all(len(g) > 1 for g in groups.merged)
        if count.mixed:  # ToMe: tokens of any modality share slots; count every surviving token
            alive = {s for s in slots[0].tolist() if s != discard}
            assert len(alive) == count.total
        else:
            prefix = 1 if layout.text_stream == layout.image_stream else layout.image_start  # image CLS / prefix tokens
            assert groups.num_tokens + prefix == count.image
        shrank |= groups.num_tokens < num_patches
    assert shrank or method == "smres"  # SmRes shrinks the grid itself, not the tokens of it
    handle.remove()


@pytest.mark.parametrize("method", METHODS)
def test_outputs_are_the_same_with_tracing_on_and_off(method):
    spec = BACKBONES["vilt"]
    model = spec.build()
    config = METHOD_CONFIGS[method][0](spec.num_layers, spec.modalities)
    batch = spec.make_batch()  # three padded rows
    torch.manual_seed(0)  # DynamicViT builds its (untrained) predictors in apply()
    with pumer_plug.apply(model, adapter="vilt", method=method, config=config):
        plain = spec.logits(model(**batch))
    torch.manual_seed(0)
    with pumer_plug.apply(model, adapter="vilt", method=method, config=config) as handle:
        trace = trace_sources(handle)
        traced_out = spec.logits(model(**batch))
        assert trace.plans
    assert torch.equal(plain, traced_out)
    assert not model._forward_pre_hooks  # remove() takes the tracer's hook out too


def test_merged_text_tokens_are_grouped_and_padding_never_appears():
    model, handle, trace, _ = traced("vilt", "pumer")
    layout = handle.adapter.token_layout(trace.inputs)
    last = max(trace.plans)
    slots, discard = trace.slots(last, "vilt", layout.image_start + 24)
    groups = token_groups(slots[0], layout.text_start, layout.num_text, discard)
    assert sum(len(g) for g in groups) == layout.num_text  # no text is pruned by PuMer
    assert len(groups) == handle.token_counts[last].text
    handle.remove()


@pytest.mark.parametrize("method", METHODS)
def test_show_draws_one_column_per_layer_with_the_handles_counts(tmp_path, method):
    task = TinyTask()
    config = METHOD_CONFIGS[method][0](2, ("text", "image"))
    result, paths = run_show(task, method, config, index=3, output_dir=tmp_path)
    assert paths["png"].stat().st_size > 0 and paths["svg"].exists()
    model = task.load_model(torch.device("cpu"))
    inputs, _ = task.batches("test", 1, 4)[3]
    with pumer_plug.apply(model, adapter="vilt", method=method, config=config) as handle:
        model(**inputs)
        counts = handle.token_counts
    assert [v.layer for v in result.layers] == sorted(counts)
    for view in result.layers:
        if not counts[view.layer].mixed:
            assert view.image_tokens == counts[view.layer].image
    has_saliency = [v.saliency is not None for v in result.layers]
    assert all(has_saliency) if method == "pumer" else not any(has_saliency)
    assert result.dense_answer and result.reduced_answer and len(result.tokens) == inputs["input_ids"].shape[1]


def test_an_adapter_without_an_image_grid_is_refused_in_one_line(monkeypatch):
    from pumer_plug.adapters.vilt import ViltAdapter
    from pumer_plug.errors import UserError

    monkeypatch.setattr(ViltAdapter, "token_layout", lambda self, inputs: None)
    task = TinyTask()
    model = task.load_model(torch.device("cpu"))
    with pytest.raises(UserError, match="cannot place the image patches"):
        trace_example(model, task, "pumer", task.default_config("pumer"), task.batches("test", 1, 1)[0])


def test_show_draws_a_new_image_and_question(tmp_path):
    from PIL import Image

    from pumer_plug.errors import UserError

    class Encoding(TinyTask):
        def encode_example(self, image, question):
            pixels = torch.from_numpy(np.asarray(image.convert("L").resize((64, 64)), dtype=np.float32))
            ids = torch.tensor([[2] + [5 + len(w) % 5 for w in question.split()]])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels.view(1, 1, 64, 64) / 255}

    path = tmp_path / "picture.png"
    Image.new("L", (80, 80), color=200).save(path)
    result, paths = run_show(Encoding(), "pumer", TinyTask().default_config("pumer"), image=path, question="what is it",
                             output_dir=tmp_path)
    assert result.target == "?" and paths["png"].name == "pumer-picture.png" and len(result.tokens) == 4
    with pytest.raises(UserError, match="cannot encode a new image"):
        run_show(TinyTask(), "pumer", TinyTask().default_config("pumer"), image=path, question="q", output_dir=tmp_path)
    with pytest.raises(UserError, match="go together"):
        run_show(TinyTask(), "pumer", TinyTask().default_config("pumer"), image=path, output_dir=tmp_path)


class CoAttentionTask(Task):
    """One example of a tiny random-init METER or BridgeTower model, answers read as argmax ids."""

    def __init__(self, backbone: str) -> None:
        super().__init__()
        self.backbone, self.spec, self.adapter = backbone, BACKBONES[backbone], BACKBONES[backbone].adapter

    def load_model(self, device):
        return self.spec.build().to(device)

    def batches(self, split, batch_size, num_examples=None):
        return [(one_row(self.backbone), torch.zeros(1, dtype=torch.long))]

    def predictions(self, model, batches):
        result = Predictions()
        with torch.inference_mode():
            for inputs, targets in batches:
                result.outputs += self.spec.logits(model(**inputs)).argmax(dim=-1).tolist()
                result.targets += targets.tolist()
        return result


@pytest.mark.parametrize("backbone", ["meter", "bridgetower"])
@pytest.mark.parametrize("method", ["pumer", "tome"])
def test_show_draws_two_stream_models_with_the_handles_counts(tmp_path, backbone, method):
    task = CoAttentionTask(backbone)
    model = task.load_model(torch.device("cpu"))
    config = METHOD_CONFIGS[method][0](task.spec.num_layers, task.spec.modalities)
    batch = task.batches("test", 1)[0]
    result = trace_example(model, task, method, config, batch)
    with pumer_plug.apply(model, adapter=backbone, method=method, config=config) as handle:
        model(**batch[0])
        counts = handle.token_counts
    assert [v.layer for v in result.layers] == sorted(counts) and result.grid == (4, 4)
    for view in result.layers:
        if not counts[view.layer].mixed:
            assert view.image_tokens == counts[view.layer].image
        groups = view.patches
        assert sorted(groups.kept + [p for g in groups.merged for p in g] + groups.pruned) == list(range(16))
    assert result.layers[-1].patches.num_tokens < 16
    if method == "pumer":
        assert sum(len(g) for g in result.layers[-1].text) == batch[0]["input_ids"].shape[1] and all(
            v.saliency is not None for v in result.layers)
    paths = draw_example(result, tmp_path / "show")
    assert paths["png"].stat().st_size > 0
