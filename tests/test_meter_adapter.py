"""METER adapter: per-stream schedules, placement, masks, presets, NLVR2, the untouched encoders
(the generic contract is in test_lifecycle.py)."""
import pytest
import torch
import torch.nn as nn

import pumer_plug
from pumer_plug import PumerConfig
from pumer_plug.adapters import AdapterError
from pumer_plug.models.meter import MeterModel
from pumer_plug.models.meter_layers import CrossSelfAttention
from tests.backbones import BACKBONES, build_meter, build_vilt, meter_batch, split_text_rows

METER = BACKBONES["meter"]
T0, V0 = 9, 17  # longest text row, image CLS + 4 x 4 patches
CONFIGS = [
    PumerConfig(reduction_layers=(0, 1, 2, 3), prune_ratio=0.2, image_merge_ratio=0.2, text_merge_ratio=0.2),
    PumerConfig(reduction_layers=(1, 3), prune_ratio=0.3, image_merge_ratio=0.5, text_merge_ratio=0.0),
    PumerConfig(reduction_layers=(0, 2), prune_ratio=0.1, image_merge_ratio=0.3, text_merge_ratio=0.2,
                proportional_attention=True),
]
PRESETS = [name for name in PumerConfig.list_presets() if name.startswith("meter-")]


def forward(model, batch):
    with torch.no_grad():
        return model(**batch)


def layer_lengths(model, config, batch):
    """Tokens the FFN of every text and image layer computes on, while plugged."""
    seen = {"text": [], "image": []}
    with pumer_plug.apply(model, adapter="meter", config=config) as handle:
        spies = [layer.intermediate.register_forward_pre_hook(lambda m, a, name=name: seen[name].append(a[0].shape[1]))
                 for name in seen for layer in getattr(model, f"cross_modal_{name}_layers")]
        forward(model, batch)
        counts, streams = handle.token_counts, dict(handle.streams)
    for spy in spies:
        spy.remove()
    return seen, counts, streams


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.describe())
def test_counts_per_stream_follow_the_schedule_and_the_layers_run_on_them(config):
    model, batch = METER.build(), METER.make_batch()
    seen, counts, streams = layer_lengths(model, config, batch)
    schedule = config.token_schedule(T0, V0, METER.num_layers)  # (text, image) leaving every block
    assert sorted(counts) == list(config.reduction_layers)
    for layer in config.reduction_layers:
        assert (counts[layer].text, counts[layer].image) == schedule[layer]
    # PuMer's placement: the text FFN and the whole image layer of a block run on the reduced tokens
    assert seen["text"] == [t for t, _ in schedule]
    assert seen["image"] == [v for _, v in schedule]
    # every row is reduced by its own real length
    for row, n in enumerate(batch["attention_mask"].sum(1).tolist()):
        t, v = config.token_schedule(n, V0, METER.num_layers)[-1]
        assert streams["text"].lengths[0][row] == t and streams["image"].lengths[0][row] == v


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.describe())
def test_cls_tokens_are_protected_so_both_poolers_read_them(config):
    model, batch = METER.build(), METER.make_batch()
    with pumer_plug.apply(model, adapter="meter", config=config) as handle:
        forward(model, batch)
        for name in ("text", "image"):
            stream = handle.streams[name]
            assert stream.protected[:, 0].all() and (stream.protected.sum(1) == 1).all(), name
            assert stream.size is None or (stream.size[:, 0] == 1).all(), name


def test_masks_and_keys_have_matching_lengths_in_every_attention():
    model, batch = METER.build(), METER.make_batch()
    checked = []

    def spy(module, args):
        hidden, mask, context = (*args, None)[:3]  # CrossSelfAttention.forward(hidden_states, attention_mask, context)
        keys = hidden if context is None else context
        assert mask.shape[-1] == keys.shape[1], (mask.shape, keys.shape)
        checked.append(keys.shape[1])

    attentions = [m for m in model.modules() if isinstance(m, CrossSelfAttention)]
    with pumer_plug.apply(model, adapter="meter", config=CONFIGS[0]):
        spies = [m.register_forward_pre_hook(spy) for m in attentions]
        forward(model, batch)
    for s in spies:
        s.remove()
    assert len(checked) == 4 * METER.num_layers and min(checked) < T0


def test_image_layer_attends_to_the_blocks_old_text_input():
    """METER's data flow: the image layer reads the text input of its block (reduced by the text
    plan), not the text layer's output."""
    model, batch = METER.build(), METER.make_batch()
    config = PumerConfig(reduction_layers=(1,), prune_ratio=0.2, image_merge_ratio=0.2, text_merge_ratio=0.2)
    grabbed = {}
    text_layer, image_layer = model.cross_modal_text_layers[1], model.cross_modal_image_layers[1]
    with pumer_plug.apply(model, adapter="meter", config=config):
        spies = [
            text_layer.register_forward_pre_hook(lambda m, a, k: grabbed.update(x=k["hidden_states"]), with_kwargs=True),
            image_layer.register_forward_pre_hook(lambda m, a, k: grabbed.update(enc=k["encoder_hidden_states"]),
                                                  with_kwargs=True),
        ]
        forward(model, batch)
    for s in spies:
        s.remove()
    assert grabbed["enc"].shape[1] == config.token_schedule(T0, V0, 4)[1][0] < T0
    torch.testing.assert_close(grabbed["enc"][:, 0], grabbed["x"][:, 0], atol=0, rtol=0)  # text CLS, never merged


def test_zero_reduction_is_bit_identical():
    model, batch = METER.build(), METER.make_batch()
    ref = forward(model, batch)
    zero = PumerConfig(reduction_layers=(0, 2), prune_ratio=0.0, image_merge_ratio=0.0, text_merge_ratio=0.0)
    with pumer_plug.apply(model, adapter="meter", config=zero):
        assert torch.equal(forward(model, batch), ref)


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_run_on_a_four_block_model(preset):
    config = PumerConfig.preset(preset)
    model, batch = METER.build(), METER.make_batch()
    with pumer_plug.apply(model, config=preset) as handle:  # adapter="auto" finds METER
        assert handle.adapter.name == "meter"
        logits = forward(model, batch)
        counts = handle.token_counts
    assert torch.isfinite(logits).all()
    assert sorted(counts) == list(config.reduction_layers)
    assert counts[max(counts)].image < V0 and counts[max(counts)].text < T0


def test_preset_blocks_are_the_official_layer_indices_halved():
    # csarron/PuMer modeling_meter.py: ``layer_idx += 2`` per co-attention block
    official = {"meter-vqa": (0, 2, 4, 6), "meter-ve": (0, 2, 4, 6),
                "meter-nlvr2": (2, 4, 6), "meter-retrieval": (2, 4, 6)}
    for name, layers in official.items():
        assert PumerConfig.preset(name).reduction_layers == tuple(i // 2 for i in layers)


def test_nlvr2_batched_equals_one_by_one_and_two_infer_passes():
    model, batch = build_meter("nlvr2"), meter_batch("nlvr2")
    config = PumerConfig.preset("meter-nlvr2")
    with pumer_plug.apply(model, adapter="meter", config=config) as handle:
        batched = forward(model, batch)
        assert handle.streams["image"].mask.shape[0] == 2 * 3  # one fused batch of 2B rows
        assert handle.token_counts[3].image < V0
        single = torch.cat([forward(model, row) for row in split_text_rows(batch)])
        with torch.no_grad():  # objectives.compute_nlvr2: one infer pass per image
            ids, mask, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
            first = model.infer(ids, mask, pixels[:, 0], 1).cls_feats
            second = model.infer(ids, mask, pixels[:, 1], 2).cls_feats
            passes = model.nlvr2_classifier(torch.cat([first, second], dim=-1))
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batched, passes, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batched, forward(model, batch), atol=1e-6)  # unplugged differs


@pytest.mark.parametrize("task", ["vqa", "nlvr2"])
def test_vision_and_text_encoders_are_untouched(task):
    model, batch = build_meter(task), meter_batch(task)
    outs = []
    grab = [model.vit_model.register_forward_hook(lambda m, a, out: outs.append(out)),
            model.text_transformer.encoder.layer[-1].register_forward_hook(
                lambda m, a, out: outs.append(out[0] if isinstance(out, tuple) else out))]
    forward(model, batch)
    with pumer_plug.apply(model, adapter="meter", config=CONFIGS[0]):
        encoders = [model.vit_model, model.text_transformer]
        assert not any(m._forward_hooks or m._forward_pre_hooks for e in encoders for m in e.modules()
                       if m not in (model.vit_model, model.text_transformer.encoder.layer[-1]))
        forward(model, batch)
    for g in grab:
        g.remove()
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3])


def test_wrong_adapter_for_the_model_raises():
    meter, vilt = build_meter(), build_vilt()
    assert pumer_plug.detect_adapter(meter) == "meter"
    with pytest.raises(AdapterError, match="meter adapter: expected .*MeterModel, got ViltForQuestionAnswering"):
        pumer_plug.apply(vilt, adapter="meter")
    with pytest.raises(AdapterError, match="vilt adapter"):
        pumer_plug.apply(meter, adapter="vilt")
    assert not pumer_plug.handle._PLUGGED


def test_missing_module_is_named_at_apply_time():
    model = build_meter()
    model.cross_modal_text_layers[2].intermediate = nn.Identity()
    with pytest.raises(AdapterError, match=r"'cross_modal_text_layers\.2\.intermediate'"):
        pumer_plug.apply(model, adapter="meter", config="meter-vqa")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_preset_beyond_the_models_depth_is_refused():
    model = build_meter(num_top_layer=2)  # MeterConfig.tiny() has 2 co-attention blocks
    assert isinstance(model, MeterModel)
    with pytest.raises(ValueError, match="beyond the model's 2 reducible layers"):
        pumer_plug.apply(model, adapter="meter", config="meter-vqa")


def test_blocks_run_out_of_order_raise():
    model, batch = METER.build(), METER.make_batch()
    with pumer_plug.apply(model, adapter="meter", config=CONFIGS[0]), torch.no_grad():
        x = torch.randn(3, T0, 32)
        y = torch.randn(3, V0, 32)
        with pytest.raises(RuntimeError, match="must run in order"):
            model.cross_modal_text_layers[2](hidden_states=x, encoder_hidden_states=y)
        forward(model, batch)  # still usable
