"""BridgeTower adapter: two streams, link towers, masks and heads (the generic contract is in test_lifecycle.py)."""
import pytest
import torch

import pumer_plug
from pumer_plug import PumerConfig
from pumer_plug.adapters import AdapterError
from tests.backbones import BACKBONES, build_bridgetower, build_vilt, split_text_rows

BT = BACKBONES["bridgetower"]
T0, V0 = 9, 17  # longest text row, image CLS + 4 x 4 patches
# transformers 5.24's BridgeTowerConfig lacks the fields BridgeTowerForContrastiveLearning reads
CONTRASTIVE = dict(contrastive_hidden_size=32, logit_scale_init_value=2.6592)
CONFIGS = [
    PumerConfig(reduction_layers=(0, 1, 2), prune_ratio=0.2, image_merge_ratio=0.2, text_merge_ratio=0.2),
    PumerConfig(reduction_layers=(1,), prune_ratio=0.3, image_merge_ratio=0.5, text_merge_ratio=0.2),
    PumerConfig(reduction_layers=(0, 2), prune_ratio=0.1, image_merge_ratio=0.3, text_merge_ratio=0.0, proportional_attention=True),
]


def build(cls_name, **overrides):
    extra = CONTRASTIVE if cls_name == "BridgeTowerForContrastiveLearning" else {}
    return build_bridgetower(cls_name, **extra, **overrides)


def forward(model, batch):
    with torch.no_grad():
        return model(**batch)


def link_towers(model):
    bt = model.bridgetower
    return {"text": list(bt.cross_modal_text_link_tower), "image": list(bt.cross_modal_image_link_tower)}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.describe())
def test_link_tower_inputs_match_the_cross_stream_at_every_layer(config):
    model, batch = BT.build(), BT.make_batch()
    seen = {"text": [], "image": []}
    with pumer_plug.apply(model, adapter="bridgetower", config=config) as handle:
        spies = [tower.register_forward_pre_hook(lambda m, a, name=name: seen[name].append((a[0].shape[1], a[1].shape[1])))
                 for name, towers in link_towers(model).items() for tower in towers]
        forward(model, batch)
        counts = handle.token_counts
    for spy in spies:
        spy.remove()
    schedule = config.token_schedule(T0, V0, BT.num_layers)
    for name, col in (("text", 0), ("image", 1)):
        assert len(seen[name]) == BT.num_layers - 1
        assert all(unimodal == cross for unimodal, cross in seen[name]), seen[name]
        # the link tower before pair i + 1 sees the stream as pair i left it
        assert [cross for _, cross in seen[name]] == [row[col] for row in schedule[:-1]]
    assert any(c.total < T0 + V0 for c in counts.values())


def test_masks_and_keys_have_matching_lengths_in_every_attention():
    model, batch = BT.build(), BT.make_batch()
    checked = []

    def spy(module, args, kwargs):
        keys = kwargs.get("encoder_hidden_states")
        keys = args[0] if keys is None else keys
        mask = kwargs.get("attention_mask")
        if mask is not None:
            assert mask.shape[-1] == keys.shape[1], (mask.shape, keys.shape)
            checked.append(keys.shape[1])

    bt = model.bridgetower
    attentions = [m for layers in (bt.cross_modal_text_layers, bt.cross_modal_image_layers) for layer in layers
                  for m in (layer.attention.self, layer.crossattention.self)]
    with pumer_plug.apply(model, adapter="bridgetower", config=CONFIGS[0]):
        spies = [m.register_forward_pre_hook(spy, with_kwargs=True) for m in attentions]
        forward(model, batch)
    for s in spies:
        s.remove()
    # after the first reduction pair every self- and cross-attention gets a mask of the reduced length
    assert len(checked) >= 4 * (BT.num_layers - 1) and min(checked) < V0


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.describe())
def test_counts_per_stream_follow_the_config(config):
    model, batch = BT.build(), BT.make_batch()
    image_layer_inputs = []  # (image tokens, text tokens) each image layer computes on
    with pumer_plug.apply(model, adapter="bridgetower", config=config) as handle:
        spies = [layer.attention.register_forward_pre_hook(lambda m, a, k: image_layer_inputs.append(a[0].shape[1]), with_kwargs=True)
                 for layer in model.bridgetower.cross_modal_image_layers]
        spies += [layer.crossattention.self.key.register_forward_pre_hook(lambda m, a: image_layer_inputs.append(a[0].shape[1]))
                  for layer in model.bridgetower.cross_modal_image_layers]
        forward(model, batch)
        counts = handle.token_counts
        per_stream = {layer: set(streams) for layer, streams in handle.state.counts.items()}
        image = handle.streams["image"]
    for spy in spies:
        spy.remove()
    schedule = config.token_schedule(T0, V0, BT.num_layers)
    assert sorted(counts) == list(config.reduction_layers)
    assert all(streams == {"text", "image"} for streams in per_stream.values())
    for layer, count in counts.items():
        assert (count.text, count.image) == schedule[layer]
    # PuMer's placement: both streams are reduced in the text layer, so the image layer of the same
    # pair already runs on the reduced image tokens and attends to the reduced text
    assert [(image_layer_inputs[2 * i], image_layer_inputs[2 * i + 1]) for i in range(BT.num_layers)] == [
        (v, t) for t, v in schedule
    ]
    assert image.protected[:, 0].all() and int(image.protected.sum()) == 3  # image CLS kept, at slot 0


def test_batched_equals_one_by_one_with_proportional_attention():
    model, batch = BT.build(), BT.make_batch()
    with pumer_plug.apply(model, adapter="bridgetower", config=CONFIGS[2]):
        batched = forward(model, batch).logits
        single = torch.cat([forward(model, row).logits for row in split_text_rows(batch)])
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=1e-4)


def test_wrong_adapter_for_the_model_raises():
    with pytest.raises(AdapterError, match="BridgeTowerModel"):
        pumer_plug.apply(build_vilt(), adapter="bridgetower", config=CONFIGS[0])
    with pytest.raises(AdapterError, match="ViltModel"):
        pumer_plug.apply(BT.build(), adapter="vilt", config=CONFIGS[0])
    assert pumer_plug.detect_adapter(BT.build()) == "bridgetower"
    assert pumer_plug.detect_adapter(build_bridgetower("BridgeTowerModel")) == "bridgetower"


def test_missing_module_is_named():
    model = BT.build()
    del model.bridgetower.cross_modal_image_layers[1].intermediate
    with pytest.raises(AdapterError, match=r"cross_modal_image_layers\.1\.intermediate"):
        pumer_plug.apply(model, adapter="bridgetower", config=CONFIGS[0])


def test_missing_attention_probabilities_raise_instead_of_running_unreduced():
    model, batch = BT.build(), BT.make_batch()
    with pumer_plug.apply(model, adapter="bridgetower", config=CONFIGS[0]):
        cross = model.bridgetower.cross_modal_text_layers[0].crossattention.self
        drop = cross.register_forward_hook(lambda m, a, out: (out[0], None), prepend=True)
        with pytest.raises(RuntimeError, match="attention probabilities"):
            forward(model, batch)
        drop.remove()
        forward(model, batch)


@pytest.mark.parametrize("cls_name", ["BridgeTowerModel", "BridgeTowerForImageAndTextRetrieval", "BridgeTowerForContrastiveLearning"])
def test_heads_run_and_are_restored(cls_name):
    model, batch = build(cls_name), BT.make_batch()
    ref = forward(model, batch)
    with pumer_plug.apply(model, adapter="auto", config=CONFIGS[0]) as handle:
        out = forward(model, batch)
        assert handle.token_counts[2].image < V0
    key = "pooler_output" if cls_name == "BridgeTowerModel" else "logits"
    assert out[key].shape == ref[key].shape and not torch.allclose(out[key], ref[key], atol=1e-6)
    torch.testing.assert_close(forward(model, batch)[key], ref[key], atol=1e-6, rtol=1e-6)


def test_contrastive_loss_backpropagates():
    model, batch = build("BridgeTowerForContrastiveLearning"), BT.make_batch()
    model.train()
    with pumer_plug.apply(model, adapter="bridgetower", config=CONFIGS[0]):
        model(**batch, return_loss=True).loss.backward()
    assert model.bridgetower.cross_modal_image_layers[-1].output.dense.weight.grad.abs().sum() > 0


def test_masked_lm_keeps_one_output_per_text_token():
    model, batch = build_bridgetower("BridgeTowerForMaskedLM"), BT.make_batch()
    with pytest.raises(ValueError, match="text merge ratio"):
        pumer_plug.apply(model, adapter="bridgetower", config=CONFIGS[0])
    batch = {**batch, "input_ids": batch["input_ids"][:, :7], "attention_mask": batch["attention_mask"][:, :7]}
    batch["attention_mask"][0, 6] = 0  # every row carries padding: the text stream must still not shrink
    with pumer_plug.apply(model, adapter="bridgetower", config=CONFIGS[2]) as handle:
        logits = forward(model, batch).logits
        counts = handle.token_counts
    assert logits.shape[:2] == (3, 7)
    assert all(c.text == 7 for c in counts.values()) and counts[2].image < V0


def test_per_layer_cross_modal_transforms():
    # (share_link_tower_layers=True does not run in transformers 5.24 itself: it indexes a single link tower)
    model, batch = build_bridgetower(share_cross_modal_transformer_layers=False), BT.make_batch()
    with pumer_plug.apply(model, adapter="bridgetower", config=CONFIGS[0]) as handle:
        batched = forward(model, batch).logits
        single = torch.cat([forward(model, row).logits for row in split_text_rows(batch)])
        assert handle.token_counts[2].total < T0 + V0
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=1e-4)
