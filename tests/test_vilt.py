"""ViLT adapter: every head, NLVR2, variable image sizes, schedule, errors."""
import pytest
import torch
import torch.nn as nn

import pumer_plug
from pumer_plug import PumerConfig
from tests.backbones import build_vilt, split_text_rows, text_batch, vilt_batch

CONFIG = PumerConfig(reduction_layers=(1, 2), prune_ratio=0.2, image_merge_ratio=0.3, text_merge_ratio=0.2)


@pytest.mark.parametrize("head", ["ViltModel", "ViltForQuestionAnswering", "ViltForImageAndTextRetrieval"])
def test_pooling_heads_run_reduced_and_restore(head):
    model, batch = build_vilt(head), vilt_batch()
    with torch.no_grad():
        ref = model(**batch)
        with pumer_plug.apply(model, config=CONFIG) as handle:
            out = model(**batch)
        assert handle.token_counts[2].image < 25
    key = "pooler_output" if head == "ViltModel" else "logits"
    assert out[key].shape == ref[key].shape and torch.isfinite(out[key]).all()


@pytest.mark.parametrize("head", ["ViltForMaskedLM", "ViltForTokenClassification"])
def test_token_level_heads_refuse_text_merging_but_accept_image_reduction(head):
    model, batch = build_vilt(head), vilt_batch()
    with pytest.raises(ValueError, match="text merge ratio to 0"):
        pumer_plug.apply(model, config=CONFIG)
    image_only = PumerConfig(reduction_layers=(1,), prune_ratio=0.2, image_merge_ratio=0.3, text_merge_ratio=0.0)
    with torch.no_grad(), pumer_plug.apply(model, config=image_only) as handle:
        out = model(**batch)
    assert out.logits.shape[1] == batch["input_ids"].shape[1]
    assert handle.token_counts[1].text == batch["input_ids"].shape[1]


def test_nlvr2_two_images_per_example():
    model = build_vilt("ViltForImagesAndTextClassification", num_images=2, modality_type_vocab_size=3)
    ids, mask = text_batch()
    pixels = torch.randn(3, 2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
    with torch.no_grad():
        ref = model(**batch).logits
        with pumer_plug.apply(model, config=CONFIG) as handle:
            out = model(**batch).logits
            single = torch.cat([model(**row).logits for row in split_text_rows(batch)])
        torch.testing.assert_close(model(**batch).logits, ref)
    assert out.shape == ref.shape and handle.token_counts[2].image < 17
    torch.testing.assert_close(out, single, atol=1e-4, rtol=1e-4)


def test_variable_image_sizes_with_pixel_mask_batched_equals_one_by_one():
    model = build_vilt()
    ids, mask = text_batch()
    pixels = torch.randn(3, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    pixel_mask = torch.ones(3, 64, 96, dtype=torch.long)
    pixel_mask[1, :, 64:] = 0  # a 64x64 image padded to 64x96
    pixel_mask[2, 32:, :] = 0  # a 32x96 image
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "pixel_mask": pixel_mask}
    rows = []
    for i, (h, w) in enumerate([(64, 96), (64, 64), (32, 96)]):
        n = int(mask[i].sum())
        rows.append({"input_ids": ids[i:i + 1, :n], "attention_mask": mask[i:i + 1, :n],
                     "pixel_values": pixels[i:i + 1, :, :h, :w], "pixel_mask": pixel_mask[i:i + 1, :h, :w]})
    with torch.no_grad(), pumer_plug.apply(model, config=CONFIG):
        batched = model(**batch).logits
        single = torch.cat([model(**row).logits for row in rows])
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=1e-4)


def test_token_counts_follow_the_config_schedule():
    model = build_vilt(num_hidden_layers=6)
    ids = torch.randint(5, 90, (2, 10))
    batch = {"input_ids": ids, "pixel_values": torch.randn(2, 3, 64, 128)}  # 32 patches + CLS
    config = PumerConfig(reduction_layers=(1, 3, 4), prune_ratio=0.1, image_merge_ratio=0.3, text_merge_ratio=0.2)
    with torch.no_grad(), pumer_plug.apply(model, config=config) as handle:
        model(**batch)
    expected = config.token_schedule(10, 33, 6)
    for layer in config.reduction_layers:
        assert (handle.token_counts[layer].text, handle.token_counts[layer].image) == expected[layer]
    assert expected[-1][1] < 33 and expected[-1][0] < 10


def test_hidden_states_really_shrink_layer_by_layer():
    model, batch = build_vilt(), vilt_batch()
    with torch.no_grad(), pumer_plug.apply(model, config=CONFIG):
        out = model(**batch, output_hidden_states=True)
    lengths = [h.shape[1] for h in out.hidden_states]
    # hidden_states[i + 1] leaves layer i; reducers sit in layers 1 and 2
    assert lengths[0] == lengths[1] > lengths[2] > lengths[3] == lengths[4]


def test_proportional_attention_changes_outputs_after_merging():
    model, batch = build_vilt(), vilt_batch()
    prop = PumerConfig(reduction_layers=(1,), prune_ratio=0.0, image_merge_ratio=0.4, text_merge_ratio=0.3,
                       proportional_attention=True)
    plain = PumerConfig(reduction_layers=(1,), prune_ratio=0.0, image_merge_ratio=0.4, text_merge_ratio=0.3)
    with torch.no_grad():
        with pumer_plug.apply(model, config=prop):
            a = model(**batch).logits
        with pumer_plug.apply(model, config=plain):
            b = model(**batch).logits
    assert not torch.allclose(a, b)


def test_left_padded_text_is_refused_with_a_clear_error():
    model, batch = build_vilt(), vilt_batch()
    batch["attention_mask"] = batch["attention_mask"].flip(1)
    with pumer_plug.apply(model, config=CONFIG), pytest.raises(ValueError, match="right padding"):
        model(**batch)


def test_adapter_errors_name_the_problem():
    with pytest.raises(ValueError, match="no adapter for Linear; registered adapters: .*vilt"):
        pumer_plug.apply(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="vilt adapter: expected a ViltModel"):
        pumer_plug.apply(nn.Linear(2, 2), adapter="vilt")
    with pytest.raises(ValueError, match="unknown adapter 'nope'; registered adapters: .*vilt"):
        pumer_plug.apply(build_vilt(), adapter="nope")
    with pytest.raises(ValueError, match="unknown method 'nope'; registered methods: .*pumer"):
        pumer_plug.apply(build_vilt(), method="nope")
    with pytest.raises(ValueError, match="unknown PuMer preset 'nope'; known presets: .*vilt-vqa"):
        pumer_plug.apply(build_vilt(), config="nope")
    with pytest.raises(TypeError, match="takes a PumerConfig"):  # a mapping is accepted since issue 17
        pumer_plug.apply(build_vilt(), config=pumer_plug.TomeConfig())


def test_missing_attention_probabilities_raise_instead_of_running_unreduced():
    model, batch = build_vilt(), vilt_batch()
    handle = pumer_plug.apply(model, config=CONFIG)
    # Simulate an upstream change: the dropout on the attention probabilities is no longer called.
    for layer in model.vilt.encoder.layer:
        layer.attention.attention.dropout._forward_pre_hooks.clear()
    with pytest.raises(RuntimeError, match="text-saliency scores were not captured at reduction layer 1"):
        model(**batch)
    handle.remove()


def test_preset_runs_on_a_twelve_layer_model():
    model = build_vilt(num_hidden_layers=12, hidden_size=32, intermediate_size=64)
    with torch.no_grad(), pumer_plug.apply(model, config="vilt-ve") as handle:
        model(**vilt_batch())
    assert sorted(handle.token_counts) == [2, 4, 6, 8]
