"""timm and open_clip ViT adapters: ToMe's token counts, fused attention, wrapped forwards vs upstream."""
import pytest
import torch
import torch.nn.functional as F

import pumer_plug
from pumer_plug import PumerConfig
from pumer_plug.adapters import AdapterError
from pumer_plug.adapters.open_clip_vit import OpenClipVitAdapter
from pumer_plug.adapters.vit import TimmVitAdapter
from pumer_plug.baselines.tome import TomeConfig
from tests.backbones import BACKBONES, build_open_clip_vit, build_timm_vit, image_batch


def tome(r=2, **kwargs):
    return TomeConfig(r=r, **kwargs)


@pytest.mark.slow
def test_vit_b16_token_counts_equal_tome():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    with pumer_plug.apply(model, method="tome", config=tome(16)) as handle, torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
        counts = [c.image for _, c in sorted(handle.token_counts.items())]
        effective = [r for _, [(r,)] in sorted(handle.method.effective_r.items())]
    assert handle.adapter.name == "timm-vit"
    assert counts == [181, 165, 149, 133, 117, 101, 85, 69, 53, 37, 21, 11]  # 197 - 16 per layer, capped at 50%
    assert effective == [16] * 11 + [10]


def test_auto_detects_each_backbone_family():
    import open_clip

    assert pumer_plug.detect_adapter(build_timm_vit()) == "timm-vit"
    assert pumer_plug.detect_adapter(build_open_clip_vit()) == "open-clip-vit"
    clip = open_clip.model.CLIP(embed_dim=16, vision_cfg=dict(layers=2, width=32, head_width=8, patch_size=8, image_size=32),
                                text_cfg=dict(context_length=8, vocab_size=50, width=32, heads=4, layers=1))
    assert pumer_plug.detect_adapter(clip) == "open-clip-vit"


def test_clip_model_reduces_only_its_image_tower():
    import open_clip

    torch.manual_seed(0)
    clip = open_clip.model.CLIP(embed_dim=16, vision_cfg=dict(layers=2, width=32, head_width=8, patch_size=8, image_size=32),
                                text_cfg=dict(context_length=8, vocab_size=50, width=32, heads=4, layers=1)).eval()
    image, text = image_batch()["x"], torch.randint(1, 50, (3, 8))
    with torch.no_grad():
        ref_image, ref_text = clip.encode_image(image), clip.encode_text(text)
        with pumer_plug.apply(clip, method="tome", config=tome(3)) as handle:
            out_image, out_text = clip.encode_image(image), clip.encode_text(text)
            counts = {i: c.image for i, c in handle.token_counts.items()}
    assert counts == {0: 14, 1: 11}
    torch.testing.assert_close(out_text, ref_text, atol=0, rtol=0)
    assert not torch.allclose(out_image, ref_image, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_timm_attention_paths_both_reduce_and_take_the_size_bias(fused, monkeypatch):
    model = build_timm_vit()
    for block in model.blocks:
        block.attn.fused_attn = fused  # the instance attribute timm sets in __init__
    before = {i: dict(vars(b.attn)) for i, b in enumerate(model.blocks)}
    masks = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        masks.append(None if attn_mask is None else tuple(attn_mask.shape))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    x = image_batch()["x"]
    outs = {}
    for proportional in (True, False):
        with pumer_plug.apply(model, method="tome", config=tome(2, proportional_attention=proportional)) as handle:
            masks.clear()
            with torch.no_grad():
                outs[proportional] = model(x)
            assert [c.image for c in handle.token_counts.values()] == [15, 13, 11, 9]
            assert all(vars(b.attn)["fused_attn"] is fused for b in model.blocks)
            if fused:  # layer 0 sees no merged token; later layers get log(size) over their keys
                expected = [None] + [(3, 1, 1, n) for n in (15, 13, 11)] if proportional else [None] * 4
                assert masks == expected
    assert not torch.allclose(outs[True], outs[False], atol=1e-6)
    assert {i: dict(vars(b.attn)) for i, b in enumerate(model.blocks)} == before


def test_timm_fused_and_unfused_attention_agree_under_tome():
    outs = []
    for fused in (True, False):
        model = build_timm_vit()
        for block in model.blocks:
            block.attn.fused_attn = fused
        with pumer_plug.apply(model, method="tome", config=tome(3)), torch.no_grad():
            outs.append(model(**image_batch()))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def test_timm_wrapped_forward_without_a_merge_equals_upstream():
    """Fails when timm's Block.forward changes: the wrapper mirrors it line by line."""
    from timm.models.vision_transformer import Block

    torch.manual_seed(0)
    block = Block(32, 4, init_values=0.5, qkv_bias=True).eval()
    x = torch.randn(2, 7, 32)
    mask = torch.randn(2, 1, 7, 7)
    wrapped = TimmVitAdapter.wrap_forward(block, lambda h: h)
    torch.testing.assert_close(wrapped(x), Block.forward(block, x), atol=0, rtol=0)
    torch.testing.assert_close(wrapped(x, attn_mask=mask), Block.forward(block, x, attn_mask=mask), atol=0, rtol=0)
    torch.testing.assert_close(wrapped(x, is_causal=True), Block.forward(block, x, is_causal=True), atol=0, rtol=0)


@pytest.mark.parametrize("batch_first", [True, False])
def test_open_clip_wrapped_forward_without_a_merge_equals_upstream(batch_first):
    """Fails when open_clip's ResidualAttentionBlock.forward changes."""
    from open_clip.transformer import ResidualAttentionBlock

    torch.manual_seed(0)
    block = ResidualAttentionBlock(32, 4, ls_init_value=0.5, batch_first=batch_first).eval()
    x = torch.randn(2, 7, 32) if batch_first else torch.randn(7, 2, 32)
    wrapped = OpenClipVitAdapter.wrap_forward(block, lambda h: h)
    torch.testing.assert_close(wrapped(x), ResidualAttentionBlock.forward(block, x), atol=0, rtol=0)
    mask = torch.randn(7, 7)
    torch.testing.assert_close(wrapped(x, attn_mask=mask), ResidualAttentionBlock.forward(block, x, attn_mask=mask))


def test_open_clip_sequence_first_transformer_reduces_like_batch_first():
    from open_clip.transformer import Transformer

    outs = []
    for batch_first in (True, False):
        model = build_open_clip_vit()
        if not batch_first:
            state = model.transformer.state_dict()
            model.transformer = Transformer(32, 4, 4, batch_first=False).eval()
            model.transformer.load_state_dict(state)
        with pumer_plug.apply(model, method="tome", config=tome(2)) as handle, torch.no_grad():
            outs.append(model(**image_batch()))
            assert [c.image for c in handle.token_counts.values()] == [15, 13, 11, 9]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def test_open_clip_keys_are_the_key_slice_of_in_proj():
    model = build_open_clip_vit()
    block = model.transformer.resblocks[0]
    seen = {}
    hook = block.ln_1.register_forward_hook(lambda m, a, out: seen.setdefault("x", out))
    with pumer_plug.apply(model, method="tome", config=tome(2, reduction_layers=(0,))) as handle:
        reduce = handle.method.reduce

        def spy(layer, stream):
            seen["keys"] = stream.keys
            return reduce(layer, stream)

        handle.method.reduce = spy
        with torch.no_grad():
            model(**image_batch())
    hook.remove()
    C = block.attn.embed_dim
    expected = seen["x"] @ block.attn.in_proj_weight[C : 2 * C].T + block.attn.in_proj_bias[C : 2 * C]  # (B, N, C)
    B, N, _ = expected.shape
    expected = expected.view(B, N, block.attn.num_heads, -1).mean(dim=2)  # mean over heads, ToMe's k.mean(1)
    torch.testing.assert_close(seen["keys"], expected)


@pytest.mark.parametrize("kind", ["distilled", "registers"])
def test_every_prefix_token_is_protected(kind):
    if kind == "distilled":
        from timm.models.deit import VisionTransformerDistilled

        torch.manual_seed(0)
        model = VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=4, num_classes=5).eval()
    else:
        model = build_timm_vit(reg_tokens=2)
    P = model.num_prefix_tokens
    with pumer_plug.apply(model, method="tome", config=tome(4)) as handle, torch.no_grad():
        model(**image_batch())
        stream = handle.streams["vit"]
        counts = [c.image for c in handle.token_counts.values()]
        assert counts == tome(4).token_schedule(16 + P, 4, num_protected=P)
        assert counts[-1] - P in (2, 3)  # the last layer is capped at half of the mergeable tokens
        removed = [a - b for a, b in zip([16 + P] + counts, counts)]
        assert [rows[0][0] for _, rows in sorted(handle.method.effective_r.items())] == removed
        assert stream.protected[:, :P].all() and stream.protected.sum().item() == 3 * P
        assert stream.sizes()[:, :P].eq(1).all()  # the prefix tokens never merged
        assert stream.sizes().sum(dim=1).flatten().tolist() == [16.0 + P] * 3


def test_only_reduction_blocks_are_wrapped_and_remove_deletes_the_wrappers():
    model = build_timm_vit()
    with pumer_plug.apply(model, method="tome", config=tome(2, reduction_layers=(1, 2))):
        assert ["forward" in vars(b) for b in model.blocks] == [False, True, True, False]
    assert not any("forward" in vars(b) for b in model.blocks)


def test_blocks_with_another_forward_are_refused_with_their_path():
    from timm.models.vision_transformer import ResPostBlock

    with pytest.raises(AdapterError, match="'blocks.0'"):
        pumer_plug.apply(build_timm_vit(block_fn=ResPostBlock), method="tome", config=tome(2))
    with pytest.raises(AdapterError, match="'transformer.resblocks.0'"):
        pumer_plug.apply(build_open_clip_vit(qk_norm=True), method="tome", config=tome(2))


def test_gradient_checkpointing_is_refused():
    model = build_timm_vit()
    model.set_grad_checkpointing(True)
    with pytest.raises(ValueError, match="gradient checkpointing"):
        pumer_plug.apply(model, method="tome", config=tome(2))
    model.set_grad_checkpointing(False)
    with pumer_plug.apply(model, method="tome", config=tome(2)):
        model.set_grad_checkpointing(True)
        with pytest.raises(RuntimeError, match="gradient checkpointing"):
            model(**image_batch())


def test_a_caller_mask_after_a_reduction_is_refused():
    model = build_timm_vit()
    with pumer_plug.apply(model, method="tome", config=tome(2)), torch.no_grad():
        with pytest.raises(RuntimeError, match="attention mask from the caller"):
            model(**image_batch(), attn_mask=torch.zeros(17, 17))


def test_pumer_is_refused_on_image_only_backbones():
    assert "pumer" not in BACKBONES["timm-vit"].tags["methods"]
    model = build_timm_vit()
    with pytest.raises(ValueError, match="timm-vit adapter: method 'pumer' needs text-saliency"):
        pumer_plug.apply(model, method="pumer", config=PumerConfig(reduction_layers=(0,)))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_a_timm_user_imports_neither_open_clip_nor_transformers():
    """``apply(vit, adapter="timm-vit")`` loads only the timm adapter (open_clip imports transformers: ~1 s)."""
    import subprocess
    import sys

    code = ("import sys, timm, pumer_plug\n"
            "model = timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=32, patch_size=16)\n"
            "with pumer_plug.apply(model, adapter='timm-vit', method='tome', config={'r': 1}) as handle:\n"
            "    import torch; model(torch.randn(1, 3, 32, 32))\n"
            "print(sorted(m for m in ('open_clip', 'transformers') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
