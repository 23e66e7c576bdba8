"""SmRes baseline: config, resizing ops, non-square grids on ViLT / BridgeTower / timm, hooks and errors."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pumer_plug
from pumer_plug.adapters.vilt import ViltAdapter
from pumer_plug.adapters.open_clip_vit import OpenClipVitAdapter
from pumer_plug.adapters.vit import TimmVitAdapter
from pumer_plug.baselines.smres import SmRes, SmResConfig, resize_images, resize_pixel_mask
from tests.backbones import (bridgetower_batch, build_bridgetower, build_open_clip_vit, build_timm_vit, build_vilt,
                             vilt_batch)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(scale=0.0), "scale"),
        (dict(scale=1.5), "scale"),
        (dict(scale=True), "scale"),
        (dict(image_size=(32,)), "image_size"),
        (dict(image_size=(32, 0)), "image_size"),
        (dict(image_size=(32.0, 48)), "image_size"),
        (dict(image_size="big"), "image_size"),
        (dict(scale=0.5, image_size=(32, 32)), "scale"),
        (dict(multiple_of=0), "multiple_of"),
        (dict(antialias=1), "antialias"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"SmResConfig.{field}"):
        SmResConfig(**kwargs)


def test_target_size():
    assert SmResConfig().scale == 0.75 and SmResConfig().target_size(384, 640) == (288, 480)
    assert SmResConfig(scale=0.5).target_size(63, 97) == (32, 49)  # round half up
    assert SmResConfig(scale=0.5, multiple_of=16).target_size(64, 100) == (32, 48)
    assert SmResConfig(scale=0.1, multiple_of=16).target_size(64, 64) == (16, 16)  # at least one patch
    assert SmResConfig(image_size=24).image_size == (24, 24)
    assert SmResConfig(image_size=[24, 40]).target_size(99, 99) == (24, 40)
    assert SmResConfig(scale=1.0).is_identity and SmResConfig(scale=1.0).target_size(63, 97) == (63, 97)


def test_resize_ops_against_torch_and_a_loop():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 2, 3, 16, 24, generator=g)  # (B, n, C, H, W), NLVR2-style
    out = resize_images(images, (8, 12))
    ref = F.interpolate(images.reshape(4, 3, 16, 24), size=(8, 12), mode="bilinear", antialias=True)
    torch.testing.assert_close(out, ref.reshape(2, 2, 3, 8, 12))
    assert resize_images(images.bfloat16(), (8, 12)).dtype == torch.bfloat16
    assert resize_images(images, (16, 24)) is images
    mask = torch.zeros(2, 16, 24, dtype=torch.long)
    mask[0], mask[1, :, :10] = 1, 1
    small = resize_pixel_mask(mask, (8, 12))
    assert small.dtype == torch.long and small.shape == (2, 8, 12)
    for i in range(8):  # nearest: output pixel (i, j) reads input pixel (2i, 2j)
        for j in range(12):
            assert small[1, i, j] == mask[1, 2 * i, 2 * j]


def run(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_vilt_non_square_grid_equals_the_model_on_resized_images():
    model, batch = build_vilt(), vilt_batch()  # 64 x 96 images, patch 16
    pixel_mask = torch.ones(3, 64, 96, dtype=torch.long)
    pixel_mask[1, :, 32:] = 0  # row 1: a 64 x 32 image padded to 64 x 96
    batch["pixel_mask"] = pixel_mask
    resized = {**batch, "pixel_values": resize_images(batch["pixel_values"], (32, 48)),
               "pixel_mask": resize_pixel_mask(pixel_mask, (32, 48))}
    ref = run(model, resized)
    with pumer_plug.apply(model, adapter="vilt", method="smres", config=SmResConfig(scale=0.5)) as handle:
        out = run(model, batch)
        assert handle.token_counts[0].image == 1 + 2 * 3  # image CLS + (32/16) x (48/16) patches
        assert handle.streams["vilt"].lengths[1] == (7, 1 + 2 * 1, 7)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(out, run(model, batch), atol=1e-4)


def test_bridgetower_interpolates_its_position_embeddings_to_a_non_square_grid():
    model, batch = build_bridgetower(), bridgetower_batch()  # 64 x 64 model, patch 16
    resized = {**batch, "pixel_values": resize_images(batch["pixel_values"], (32, 48))}
    ref = run(model, {**resized, "interpolate_pos_encoding": True})
    with pytest.raises(ValueError, match="doesn't match model"):
        run(model, resized)  # without interpolation the model refuses another size
    with pumer_plug.apply(model, adapter="bridgetower", method="smres", config=SmResConfig(image_size=(32, 48))) as handle:
        out = run(model, batch)
        assert handle.token_counts[0].image == 1 + 2 * 3
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


def test_timm_with_dynamic_img_size_takes_a_non_square_grid():
    model = build_timm_vit(dynamic_img_size=True)  # 32 x 32, patch 8
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(resize_images(x, (16, 24)))
    with pumer_plug.apply(model, adapter="timm-vit", method="smres", config=SmResConfig(image_size=(16, 24))) as handle:
        with torch.no_grad():
            out = model(x)
        assert handle.token_counts[0].total == 1 + 2 * 3
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.skipif(not hasattr(TimmVitAdapter, "accept_image_size"), reason="timm-vit adapter lacks accept_image_size")
def test_a_fixed_size_timm_vit_takes_a_non_square_grid_through_its_adapter():
    model, dynamic = build_timm_vit(), build_timm_vit(dynamic_img_size=True)
    dynamic.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref, dense = dynamic(resize_images(x, (16, 24))), model(x)
    with pumer_plug.apply(model, adapter="timm-vit", method="smres", config=SmResConfig(image_size=(16, 24))) as handle:
        with torch.no_grad():
            out = model(x)
        assert handle.token_counts[0].total == 1 + 2 * 3
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    assert not model.dynamic_img_size and model.patch_embed.strict_img_size and model.patch_embed.flatten
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense, atol=0, rtol=0)


@pytest.mark.skipif(not hasattr(OpenClipVitAdapter, "accept_image_size"), reason="open-clip-vit adapter lacks accept_image_size")
def test_open_clip_embeds_mirror_upstream_and_take_a_non_square_grid():
    model = build_open_clip_vit()
    x = torch.randn(2, 3, 32, 32)
    with pumer_plug.apply(model, adapter="open-clip-vit", method="smres", config=SmResConfig(image_size=(16, 24))) as handle:
        with torch.no_grad():
            torch.testing.assert_close(model._embeds(x), type(model)._embeds(model, x), atol=0, rtol=0)  # native size
            model(x)
        assert handle.token_counts[0].total == 1 + 2 * 3
    assert "_embeds" not in vars(model)


def test_the_adapter_hook_is_used_when_the_adapter_has_one(monkeypatch):
    calls = []
    monkeypatch.setattr(ViltAdapter, "accept_image_size", lambda self, handle: calls.append(handle), raising=False)
    model = build_vilt()
    with pumer_plug.apply(model, adapter="vilt", method="smres") as handle:
        assert calls == [handle]


def test_errors_name_what_is_missing():
    model, batch = build_vilt(), vilt_batch()
    with pumer_plug.apply(model, adapter="vilt", method="smres"):
        with pytest.raises(RuntimeError, match="no image tensor"):
            model(**{**batch, "pixel_values": None})

    class TextOnly(nn.Module):
        def forward(self, input_ids):
            return input_ids

    text_only = TextOnly()
    handle = SimpleNamespace(model=text_only, adapter=SimpleNamespace(image_module=text_only), add_forward_pre_hook=None)
    with pytest.raises(ValueError, match="TextOnly.forward.*no image argument"):
        SmRes(SmResConfig()).attach(handle)
