"""The one per-forward state, host-device syncs, method extras, and what apply() refuses."""
import dataclasses
import sys

import pytest
import torch

import pumer_plug
from pumer_plug import DynamicViTConfig, ForwardState, PumerConfig, SmResConfig, TomeConfig
from pumer_plug.adapters.coattention import BlockState
from pumer_plug.ops.counts import RowCounts, merge_count, prune_count
from tests.backbones import BACKBONES, METHOD_CONFIGS, build_open_clip_vit, build_vilt, vilt_batch

OUR_CODE = ("pumer_plug", "/adapters/", "/baselines/")


def run(model, backbone, batch):
    with torch.no_grad():
        return backbone.logits(model(**batch))


# -- one state ---------------------------------------------------------------------------------------
def test_every_forward_gets_one_fresh_state_holding_streams_counts_and_the_methods_scratch():
    backbone = BACKBONES["meter"]
    model, batch = backbone.build(), backbone.make_batch()
    with pumer_plug.apply(model, adapter="meter", method="tome", config=TomeConfig(r=2)) as handle:
        run(model, backbone, batch)
        first = handle.state
        assert isinstance(first, ForwardState) and set(first.streams) == {"text", "image"}
        assert isinstance(first.adapter, BlockState) and first.adapter.block == 3
        assert first.method.effective_r is handle.method.effective_r and first.method.effective_r
        assert handle.streams is first.streams and sorted(first.counts) == sorted(handle.token_counts)
        run(model, backbone, batch)
        assert handle.state is not first and handle.state.method is not first.method
    assert handle.token_counts and not handle.streams  # counts stay readable after remove(), tensors go


@pytest.mark.parametrize("method", sorted(METHOD_CONFIGS))
@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_adapters_and_methods_keep_nothing_of_a_forward_on_themselves(name, method):
    backbone = BACKBONES[name]
    if method not in backbone.tags.get("methods", {method}):
        pytest.skip(f"{method} does not run on {name}")
    model, batch = backbone.build(), backbone.make_batch()
    config = METHOD_CONFIGS[method][0](backbone.num_layers, backbone.modalities)
    with pumer_plug.apply(model, adapter=name, method=method, config=config) as handle:
        owners = {"adapter": handle.adapter, "method": handle.method}
        before = {k: dict(vars(obj)) for k, obj in owners.items()}
        run(model, backbone, batch)
        for key, obj in owners.items():
            after = {k: v for k, v in vars(obj).items() if k != "_state"}  # the method's pointer to handle.state
            assert after.keys() == before[key].keys() - {"_state"}
            assert all(after[k] is before[key][k] for k in after), key
        assert handle.method._state is handle.state


# -- host-device syncs ---------------------------------------------------------------------------------
def _from_our_code(depth: int = 2) -> bool:
    name = sys._getframe(depth).f_code.co_filename
    return any(part in name for part in OUR_CODE)


@pytest.mark.parametrize("method,name", [("pumer", "vilt"), ("pumer", "meter"), ("pumer", "bridgetower"),
                                         ("tome", "vilt"), ("tome", "timm-vit"), ("dynamicvit", "vilt")])
def test_a_forward_copies_no_count_to_the_device_and_reads_counts_back_once(monkeypatch, method, name):
    backbone = BACKBONES[name]
    model, batch = backbone.build(), backbone.make_batch()
    config = METHOD_CONFIGS[method][0](backbone.num_layers, backbone.modalities)
    with pumer_plug.apply(model, adapter=name, method=method, config=config) as handle:
        run(model, backbone, batch)  # warm up
        copies, reads = [], []
        tensor, tolist, item = torch.tensor, torch.Tensor.tolist, torch.Tensor.item

        def spy_tensor(*args, **kwargs):
            if _from_our_code():
                copies.append(args[0])
            return tensor(*args, **kwargs)

        def spy_tolist(self):
            if _from_our_code():
                reads.append("tolist")
            return tolist(self)

        def spy_item(self):
            if _from_our_code():
                reads.append("item")
            return item(self)

        monkeypatch.setattr(torch, "tensor", spy_tensor)
        monkeypatch.setattr(torch.Tensor, "tolist", spy_tolist)
        monkeypatch.setattr(torch.Tensor, "item", spy_item)
        run(model, backbone, batch)
        monkeypatch.undo()
        assert handle.token_counts
    assert copies == []  # host-to-device copies of per-row counts
    assert len(reads) <= 1  # the real lengths of every segment, read once at the start


def test_counts_on_the_device_equal_the_host_counts():
    n = torch.arange(0, 600)
    counts = RowCounts(n.tolist(), n)
    for ratio in (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9):
        for fn in (prune_count, merge_count):
            out = fn(counts, ratio, 1)
            assert out.tensor.tolist() == list(out) == [fn(int(m), ratio, 1) for m in n]
    assert prune_count(145, 0.1, 1) == 14  # half to even, as the released code


# -- DynamicViT ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(n for n, b in BACKBONES.items() if "dynamicvit" in b.tags["methods"]))
def test_dynamicvit_predictors_exist_right_after_apply_at_the_adapters_width(name):
    backbone = BACKBONES[name]
    model = backbone.build()
    config = DynamicViTConfig(reduction_layers=(0,), keep_ratio=0.5)
    with pumer_plug.apply(model, adapter=name, method="dynamicvit", config=config) as handle:
        predictors = handle.method.modules()
        assert predictors is not None and handle.adapter.hidden_size > 0
        assert predictors["0"].in_conv[1].in_features == handle.adapter.hidden_size
        run(model, backbone, backbone.make_batch())  # the width fits the tokens


def test_dynamicvit_training_losses_are_weighted_and_its_state_round_trips():
    model, batch = build_vilt(), vilt_batch()
    config = DynamicViTConfig(reduction_layers=(0, 2), keep_ratio=0.5, keep_ratio_weight=3.0)
    with pumer_plug.apply(model, adapter="vilt", method="dynamicvit", config=config) as handle:
        assert handle.method.training_losses() == {}
        model.train()
        torch.manual_seed(0)
        model(**batch)
        from pumer_plug.baselines.dynamicvit import keep_ratio_loss

        losses = handle.method.training_losses()
        torch.testing.assert_close(losses["keep_ratio"], 3.0 * keep_ratio_loss(handle.method))
        state = handle.method.state_dict()
    other = pumer_plug.make_method("dynamicvit", config)
    other._build(64)
    other.load_state_dict(state)
    assert all(torch.equal(state[k], v) for k, v in other.state_dict().items())
    assert DynamicViTConfig().keep_ratio_weight == 2.0


@pytest.mark.parametrize("name", ["timm-vit", "open-clip-vit"])
def test_dynamicvit_in_eval_passes_no_attention_mask(name):
    backbone = BACKBONES[name]
    model, batch = backbone.build(), backbone.make_batch()
    masks = []
    config = DynamicViTConfig(reduction_layers=(0, 2), keep_ratio=0.5)
    with pumer_plug.apply(model, adapter=name, method="dynamicvit", config=config) as handle:
        spies = [block.attn.register_forward_pre_hook(  # after the adapter's hooks: sees what attention gets
            lambda m, a, k: masks.append(k.get("attn_mask", a[5] if len(a) > 5 else None)), with_kwargs=True)
            for block in (model.blocks if name == "timm-vit" else model.transformer.resblocks)]
        run(model, backbone, batch)
        assert handle.token_counts[2].image < 17  # it did prune
        assert masks and all(m is None for m in masks)  # fused SDPA stays possible
        masks.clear()
        model.train()
        model(**batch)
        assert any(m is not None for m in masks)  # the keep policy enters attention in training
    for spy in spies:
        spy.remove()


# -- configs from mappings, unsupported pairs, nested handles ---------------------------------------
def test_apply_takes_a_mapping_validated_by_the_methods_config():
    model = build_vilt()
    with pumer_plug.apply(model, adapter="vilt", method="tome", config={"r": 3}) as handle:
        assert handle.config == TomeConfig(r=3)
    with pytest.raises(ValueError, match=r"TomeConfig\.r"):
        pumer_plug.apply(model, adapter="vilt", method="tome", config={"r": -1})
    with pytest.raises(ValueError, match="unknown TomeConfig field"):
        pumer_plug.apply(model, adapter="vilt", method="tome", config={"ratio": 3})


def test_every_unsupported_pair_fails_at_apply_naming_method_and_adapter():
    for method in pumer_plug.list_methods():
        cls = pumer_plug.METHODS.get(method)
        for name in pumer_plug.list_adapters():
            adapter = pumer_plug.ADAPTERS.get(name)
            if cls.requires <= adapter.capabilities:
                continue
            backbone = BACKBONES[name]
            model = backbone.build()
            config = METHOD_CONFIGS[method][0](backbone.num_layers, backbone.modalities)
            with pytest.raises(ValueError, match=rf"{name} adapter: method '{method}' needs"):
                pumer_plug.apply(model, adapter=name, method=method, config=config)
            assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_a_handle_higher_up_or_lower_down_is_named():
    model = build_vilt()
    with pumer_plug.apply(model, adapter="vilt", config=PumerConfig(reduction_layers=(1,))):
        with pytest.raises(RuntimeError, match="higher up: it is 'vilt' of a plugged ViltForQuestionAnswering"):
            pumer_plug.apply(model.vilt, adapter="vilt", config=PumerConfig(reduction_layers=(1,)))
    with pumer_plug.apply(model.vilt, adapter="vilt", config=PumerConfig(reduction_layers=(1,))):
        with pytest.raises(RuntimeError, match="lower down, on its submodule 'vilt'"):
            pumer_plug.apply(model, adapter="vilt", config=PumerConfig(reduction_layers=(1,)))


def tiny_clip():
    import open_clip

    torch.manual_seed(0)
    return open_clip.CLIP(embed_dim=16, vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2, head_width=8),
                          text_cfg=dict(context_length=8, vocab_size=50, width=32, heads=4, layers=1)).eval()


def test_smres_on_a_whole_clip_reduces_encode_image_too_and_clip_then_visual_is_named():
    clip, tower = tiny_clip(), tiny_clip().visual
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        dense = clip.encode_image(x)
    with pumer_plug.apply(tower, method="smres", config=SmResConfig(image_size=16)), torch.no_grad():
        expected = tower(x)  # the tower alone, plugged (tested in test_smres.py)
    with pumer_plug.apply(clip, method="smres", config=SmResConfig(image_size=16)) as handle:
        with torch.no_grad():
            out = clip.encode_image(x)
        assert handle.token_counts[0].image == 1 + 2 * 2
        with pytest.raises(RuntimeError, match="higher up: it is 'visual'"):
            pumer_plug.apply(clip.visual, method="tome")
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, dense, atol=1e-4)


def test_a_config_that_reduces_nothing_warns():
    with pytest.warns(UserWarning, match="nothing will be reduced"):
        PumerConfig(reduction_layers=())
    with pytest.warns(UserWarning, match="nothing will be reduced"):
        TomeConfig(r=4, reduction_layers=())
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PumerConfig(reduction_layers=(), prune_ratio=0, image_merge_ratio=0, text_merge_ratio=0)
        dataclasses.replace(PumerConfig(), prune_ratio=0.2)
