"""METER model: official key set, checkpoint round trips, shapes, padding, gradients, references."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pumer_plug.models.meter import (
    TASKS,
    MeterConfig,
    MeterModel,
    MeterOutput,
    load_meter_checkpoint,
    save_meter_checkpoint,
)
from pumer_plug.models.meter_layers import CrossLayer, extend_attention_mask

TINY = MeterConfig.tiny()


# ------------------------------------------------------------------- expected official key set
# Derived from METER's meter_module.py (module attributes), bert_model.py (BertCrossLayer,
# BertAttention, BertSelfAttention, BertSelfOutput, BertIntermediate, BertOutput), clip_model.py
# (CLIP, VisualTransformer, Transformer with layers - 1 ResidualAttentionBlocks), heads.py
# (Pooler, ITMHead) and transformers 4.6 RobertaModel (with pooler), minus the 4.6-only buffer
# text_transformer.embeddings.position_ids.

WB = ("weight", "bias")


def _linear(prefix: str) -> list[str]:
    return [f"{prefix}.{p}" for p in WB]


def _bert_layer(prefix: str, cross: bool) -> list[str]:
    keys = []
    for block in ("attention", "crossattention") if cross else ("attention",):
        for lin in ("self.query", "self.key", "self.value", "output.dense", "output.LayerNorm"):
            keys += _linear(f"{prefix}.{block}.{lin}")
    for lin in ("intermediate.dense", "output.dense", "output.LayerNorm"):
        keys += _linear(f"{prefix}.{lin}")
    return keys


def expected_keys(cfg: MeterConfig, task: str) -> set[str]:
    keys = _linear("cross_modal_text_transform") + _linear("cross_modal_image_transform")
    keys += ["token_type_embeddings.weight"]
    keys += ["vit_model.positional_embedding", *_linear("vit_model.ln_final")]
    v = "vit_model.visual"
    keys += [f"{v}.class_embedding", f"{v}.positional_embedding", f"{v}.conv1.weight"]
    keys += _linear(f"{v}.ln_pre") + _linear(f"{v}.ln_post")
    for i in range(cfg.vision_layers - 1):
        b = f"{v}.transformer.resblocks.{i}"
        keys += [f"{b}.attn.in_proj_weight", f"{b}.attn.in_proj_bias", *_linear(f"{b}.attn.out_proj")]
        for lin in ("ln_1", "mlp.c_fc", "mlp.c_proj", "ln_2"):
            keys += _linear(f"{b}.{lin}")
    e = "text_transformer.embeddings"
    keys += [f"{e}.word_embeddings.weight", f"{e}.position_embeddings.weight", f"{e}.token_type_embeddings.weight"]
    keys += _linear(f"{e}.LayerNorm") + _linear("text_transformer.pooler.dense")
    for i in range(cfg.text_num_layers):
        keys += _bert_layer(f"text_transformer.encoder.layer.{i}", cross=False)
    for stream in ("text", "image"):
        for i in range(cfg.num_top_layer):
            keys += _bert_layer(f"cross_modal_{stream}_layers.{i}", cross=True)
        keys += _linear(f"cross_modal_{stream}_pooler.dense")
    heads = {"vqa": "vqa_classifier", "nlvr2": "nlvr2_classifier", "snli": "snli_classifier"}
    if task in heads:
        keys += [k for j in (0, 1, 3) for k in _linear(f"{heads[task]}.{j}")]
    else:
        keys += _linear("itm_score.fc") + _linear("rank_output")
    return set(keys)


def key_count(cfg: MeterConfig, task: str) -> int:
    text = 5 + 16 * cfg.text_num_layers + 2
    vision = 3 + 7 + 12 * (cfg.vision_layers - 1)
    fusion = 4 + 1 + 2 * 26 * cfg.num_top_layer + 4
    return text + vision + fusion + (4 if task == "itm" else 6)


@pytest.mark.parametrize("task", TASKS)
def test_base_state_dict_keys_equal_official(task):
    cfg = MeterConfig()
    with torch.device("meta"):
        model = MeterModel(cfg, task=task)
    sd = model.state_dict()
    assert set(sd) == expected_keys(cfg, task)
    assert len(sd) == key_count(cfg, task) == (666 if task == "itm" else 668)
    assert len(model.vit_model.visual.transformer.resblocks) == 11  # CLIP ViT-B/16 minus its last block
    assert sd["vit_model.visual.positional_embedding"].shape == (24 * 24 + 1, 768)
    assert sd["vit_model.positional_embedding"].shape == (77, 512)
    assert sd["text_transformer.embeddings.word_embeddings.weight"].shape == (50265, 768)
    assert sd["text_transformer.embeddings.position_embeddings.weight"].shape == (514, 768)
    assert sd["cross_modal_image_layers.5.intermediate.dense.weight"].shape == (3072, 768)
    assert sd["token_type_embeddings.weight"].shape == (3 if task == "nlvr2" else 2, 768)
    head_shapes = {
        "vqa": ("vqa_classifier.3.weight", (3129, 1536)),
        "nlvr2": ("nlvr2_classifier.0.weight", (1536, 3072)),
        "snli": ("snli_classifier.3.weight", (3, 1536)),
        "itm": ("rank_output.weight", (1, 1536)),
    }
    name, shape = head_shapes[task]
    assert sd[name].shape == shape


def test_tiny_state_dict_keys_and_layer0_exact():
    model = MeterModel(TINY, task="vqa")
    assert set(model.state_dict()) == expected_keys(TINY, "vqa")
    layer0 = {k for k in model.state_dict() if k.startswith("cross_modal_text_layers.0.")}
    assert layer0 == set(_bert_layer("cross_modal_text_layers.0", cross=True))
    assert len(layer0) == 26


# --------------------------------------------------------------------------------------- inputs


def make_batch(task: str, b: int = 3, t: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, TINY.vocab_size, (b, t), generator=g)
    ids[:, 0] = 0  # <s>
    mask = torch.ones(b, t, dtype=torch.long)
    for i, n in enumerate(range(t, 2, -2)[:b]):  # mixed lengths, right-padded with pad id 1
        ids[i, n:] = TINY.pad_token_id
        mask[i, n:] = 0
    shape = (b, 2, 3, TINY.image_size, TINY.image_size) if task == "nlvr2" else (b, 3, TINY.image_size, TINY.image_size)
    return ids, mask, torch.randn(shape, generator=g)


def tiny_model(task: str, seed: int = 0) -> MeterModel:
    torch.manual_seed(seed)
    return MeterModel(TINY, task=task).eval()


NUM_CLASSES = {"vqa": TINY.vqav2_label_size, "nlvr2": 2, "snli": 3, "itm": 2}


@pytest.mark.parametrize("task", TASKS)
def test_forward_shapes(task):
    model = tiny_model(task)
    ids, mask, pixels = make_batch(task)
    out = model(ids, mask, pixels, return_features=True)
    assert isinstance(out, MeterOutput)
    v = 1 + (TINY.image_size // TINY.patch_size) ** 2
    passes = 2 if task == "nlvr2" else 1
    assert out.logits.shape == (3, NUM_CLASSES[task])
    assert out.text_feats.shape == (3 * passes, 7, TINY.hidden_size)
    assert out.image_feats.shape == (3 * passes, v, TINY.hidden_size)
    assert out.cls_feats.shape == (3 * passes, 2 * TINY.hidden_size)
    assert (out.rank_scores is not None) == (task == "itm")
    assert torch.equal(model(ids, mask, pixels), out.logits)


def test_wrong_pixel_shape_and_task_raise():
    ids, mask, pixels = make_batch("vqa")
    with pytest.raises(ValueError, match="nlvr2"):
        tiny_model("nlvr2")(ids, mask, pixels)
    with pytest.raises(ValueError, match="unknown METER task"):
        MeterModel(TINY, task="mlm")


@pytest.mark.parametrize("task", TASKS)
def test_batched_equals_one_by_one_with_padding(task):
    model = tiny_model(task)
    ids, mask, pixels = make_batch(task)
    assert mask.sum(1).unique().numel() == 3
    with torch.inference_mode():
        batched = model(ids, mask, pixels)
        for i in range(3):
            n = int(mask[i].sum())  # drop this sample's padding altogether
            single = model(ids[i : i + 1, :n], mask[i : i + 1, :n], pixels[i : i + 1])
            torch.testing.assert_close(batched[i : i + 1], single, rtol=1e-4, atol=1e-5)


def test_nlvr2_equals_two_official_infer_passes():
    model = tiny_model("nlvr2")
    ids, mask, pixels = make_batch("nlvr2")
    with torch.inference_mode():
        first = model.infer(ids, mask, pixels[:, 0], image_token_type_idx=1).cls_feats
        second = model.infer(ids, mask, pixels[:, 1], image_token_type_idx=2).cls_feats
        expected = model.nlvr2_classifier(torch.cat([first, second], dim=-1))
        torch.testing.assert_close(model(ids, mask, pixels), expected, rtol=1e-5, atol=1e-6)
    tte = model.token_type_embeddings.weight
    assert torch.equal(tte[2], tte[1])  # the second image type starts from the first


@pytest.mark.parametrize("task", TASKS)
def test_gradient_reaches_every_used_parameter(task):
    torch.manual_seed(0)
    model = MeterModel(TINY, task=task).train()
    ids, mask, pixels = make_batch(task)
    out = model(ids, mask, pixels, return_features=True)
    loss = out.logits.square().sum() + (out.rank_scores.square().sum() if task == "itm" else 0)
    loss.backward()
    # CLIP's text leftovers and RoBERTa's own pooler are in the checkpoints but never used by METER.
    unused = ("vit_model.positional_embedding", "vit_model.ln_final.", "text_transformer.pooler.")
    for name, p in model.named_parameters():
        if name.startswith(unused):
            assert p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


# ---------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".safetensors"])
@pytest.mark.parametrize("task", TASKS)
def test_checkpoint_round_trip(tmp_path, task, suffix):
    src, dst = tiny_model(task, seed=1), tiny_model(task, seed=2)
    ids, mask, pixels = make_batch(task)
    path = tmp_path / f"meter{suffix}"
    save_meter_checkpoint(src, path)
    if suffix == ".ckpt":
        assert set(torch.load(path, weights_only=True)) == {"state_dict"}
    with torch.inference_mode():
        assert not torch.allclose(src(ids, mask, pixels), dst(ids, mask, pixels))
        assert load_meter_checkpoint(dst, path) == ([], [])
        assert torch.equal(src(ids, mask, pixels), dst(ids, mask, pixels))


def test_lightning_checkpoint_with_legacy_buffer_and_extras(tmp_path):
    src, dst = tiny_model("vqa", seed=1), tiny_model("vqa", seed=2)
    state = dict(src.state_dict())
    # transformers 4.6 saved this buffer; Lightning adds epoch/optimizer entries beside the weights.
    state["text_transformer.embeddings.position_ids"] = torch.arange(TINY.text_max_position_embeddings)[None]
    torch.save({"epoch": 3, "global_step": 10, "state_dict": state, "optimizer_states": []}, tmp_path / "x.ckpt")
    load_meter_checkpoint(dst, tmp_path / "x.ckpt")
    ids, mask, pixels = make_batch("vqa")
    with torch.inference_mode():
        assert torch.equal(src(ids, mask, pixels), dst(ids, mask, pixels))


def test_strict_loading_names_missing_and_unexpected_keys(tmp_path):
    model = tiny_model("vqa")
    state = dict(model.state_dict())
    del state["vqa_classifier.3.bias"]
    state["mlm_score.bias"] = torch.zeros(3)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ValueError) as err:
        load_meter_checkpoint(model, tmp_path / "bad.pt")
    msg = str(err.value)
    assert "1 missing key(s): vqa_classifier.3.bias" in msg
    assert "1 unexpected key(s): mlm_score.bias" in msg
    missing, unexpected = load_meter_checkpoint(model, tmp_path / "bad.pt", strict=False)
    assert (missing, unexpected) == (["vqa_classifier.3.bias"], ["mlm_score.bias"])


def test_shape_mismatch_raises_even_when_not_strict(tmp_path):
    state = dict(tiny_model("vqa").state_dict())
    state["cross_modal_text_pooler.dense.bias"] = torch.zeros(5)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="mismatched-shape.*cross_modal_text_pooler.dense.bias"):
        load_meter_checkpoint(tiny_model("vqa"), tmp_path / "bad.pt", strict=False)


def test_nlvr2_grows_token_types_and_itm_derives_rank_output(tmp_path):
    pretrained = tiny_model("itm", seed=3)
    state = {k: v for k, v in pretrained.state_dict().items() if not k.startswith("rank_output")}
    torch.save({"state_dict": state}, tmp_path / "pretrain.ckpt")
    nlvr2 = tiny_model("nlvr2")
    missing, unexpected = load_meter_checkpoint(nlvr2, tmp_path / "pretrain.ckpt", strict=False)
    tte = pretrained.token_type_embeddings.weight
    assert torch.equal(nlvr2.token_type_embeddings.weight, torch.cat([tte, tte[1:]]))
    assert all(k.startswith("nlvr2_classifier") for k in missing) and missing
    assert all(k.startswith("itm_score") for k in unexpected)
    itm = tiny_model("itm")
    assert load_meter_checkpoint(itm, tmp_path / "pretrain.ckpt") == ([], [])
    assert torch.equal(itm.rank_output.weight, pretrained.itm_score.fc.weight[1:])


def test_positional_embedding_interpolated_for_new_image_size(tmp_path):
    small = tiny_model("vqa")
    save_meter_checkpoint(small, tmp_path / "small.pt")
    big = MeterModel(MeterConfig(**{**vars(TINY), "image_size": 48}), task="vqa").eval()
    load_meter_checkpoint(big, tmp_path / "small.pt")
    pos = big.vit_model.visual.positional_embedding
    assert pos.shape == (1 + 6 * 6, TINY.vision_width)
    assert torch.equal(pos[0], small.vit_model.visual.positional_embedding[0])
    ids, mask, _ = make_batch("vqa")
    assert big(ids, mask, torch.randn(3, 3, 48, 48)).shape == (3, TINY.vqav2_label_size)
    # an identity resize (4x4 -> 4x4) reproduces the grid, so the interpolation is aligned
    from pumer_plug.models.meter_layers import interpolate_positional_embedding

    p = small.vit_model.visual.positional_embedding.detach()
    torch.testing.assert_close(interpolate_positional_embedding(p, 4), p)


class _HyperParams:  # stands in for Lightning's AttributeDict / sacred's ReadOnlyDict
    pass


def test_unreadable_pickle_gives_clear_error(tmp_path):
    torch.save({"state_dict": {"a": torch.zeros(1)}, "hyper_parameters": _HyperParams()}, tmp_path / "x.ckpt")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_meter_checkpoint(tiny_model("vqa"), tmp_path / "x.ckpt")


# ----------------------------------------------------------------------- independent references


def test_cross_layer_matches_functional_reference():
    torch.manual_seed(0)
    c, h = 32, 4
    layer = CrossLayer(c, h, 4 * c, dropout=0.0, eps=1e-12).eval()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x, y = torch.randn(2, 5, c), torch.randn(2, 9, c)
    xm = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    ym = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])

    def attn(block, q_in, kv_in, keep):
        def heads(t):
            return t.view(t.shape[0], t.shape[1], h, c // h).transpose(1, 2)

        q = heads(block.self.query(q_in))
        k, v = heads(block.self.key(kv_in)), heads(block.self.value(kv_in))
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :].bool())
        ctx = ctx.transpose(1, 2).reshape(q_in.shape)
        ln = block.output.LayerNorm
        return F.layer_norm(block.output.dense(ctx) + q_in, (c,), ln.weight, ln.bias, 1e-12)

    a = attn(layer.attention, x, x, xm)
    a = attn(layer.crossattention, a, y, ym)
    ffn = layer.output.dense(F.gelu(layer.intermediate.dense(a)))
    want = F.layer_norm(ffn + a, (c,), layer.output.LayerNorm.weight, layer.output.LayerNorm.bias, 1e-12)
    got = layer(hidden_states=x, encoder_hidden_states=y, attention_mask=extend_attention_mask(xm, x.dtype),
                encoder_attention_mask=extend_attention_mask(ym, y.dtype))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_attention_probabilities_pass_through_dropout_hooks():
    import dataclasses

    model = MeterModel(dataclasses.replace(TINY, attn_implementation="eager"), task="vqa").eval()
    ids, mask, pixels = make_batch("vqa")
    seen = {}

    def grab(name):
        return lambda module, args: seen.__setitem__(name, args[0])

    text0, image0 = model.cross_modal_text_layers[0], model.cross_modal_image_layers[0]
    handles = [text0.crossattention.self.dropout.register_forward_pre_hook(grab("t2i")),
               image0.attention.self.dropout.register_forward_pre_hook(grab("i2i"))]
    with torch.inference_mode():
        model(ids, mask, pixels)
    for hd in handles:
        hd.remove()
    v = 1 + (TINY.image_size // TINY.patch_size) ** 2
    assert seen["t2i"].shape == (3, TINY.num_heads, 7, v)
    assert seen["i2i"].shape == (3, TINY.num_heads, v, v)
    torch.testing.assert_close(seen["t2i"].sum(-1), torch.ones(3, TINY.num_heads, 7))


def test_layer_pre_hook_with_kwargs_sees_masks():
    model = tiny_model("vqa")
    ids, mask, pixels = make_batch("vqa")
    calls = []

    def hook(module, args, kwargs):
        assert args == ()
        calls.append({k: tuple(v.shape) for k, v in kwargs.items()})

    hd = model.cross_modal_image_layers[1].register_forward_pre_hook(hook, with_kwargs=True)
    with torch.inference_mode():
        model(ids, mask, pixels)
    hd.remove()
    v = 1 + (TINY.image_size // TINY.patch_size) ** 2
    assert calls == [{"hidden_states": (3, v, 32), "encoder_hidden_states": (3, 7, 32),
                      "attention_mask": (3, 1, 1, v), "encoder_attention_mask": (3, 1, 1, 7)}]


def test_text_encoder_matches_roberta_forward():
    model = tiny_model("vqa")
    ids, mask, _ = make_batch("vqa")
    with torch.inference_mode():
        ours = model.encode_text(ids, mask)
        ref = model.text_transformer(input_ids=ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    torch.testing.assert_close(ours[keep], ref[keep], rtol=1e-4, atol=1e-5)


def test_vision_tower_matches_open_clip():
    open_clip_transformer = pytest.importorskip("open_clip.transformer")
    model = tiny_model("vqa")
    ref = open_clip_transformer.VisionTransformer(
        image_size=TINY.image_size, patch_size=TINY.patch_size, width=TINY.vision_width, layers=TINY.num_vision_blocks,
        heads=TINY.vision_heads, mlp_ratio=4.0, output_dim=TINY.vision_width, act_layer=open_clip_transformer.QuickGELU,
        output_tokens=True).eval()
    missing, unexpected = ref.load_state_dict(model.vit_model.visual.state_dict(), strict=False)
    assert missing == ["proj"] and unexpected == []
    with torch.no_grad():
        ref.proj.copy_(torch.eye(TINY.vision_width))
    pixels = torch.randn(2, 3, TINY.image_size, TINY.image_size)
    with torch.inference_mode():
        pooled, tokens = ref(pixels)
        ours = model.vit_model(pixels)
    torch.testing.assert_close(ours[:, 0], pooled, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours[:, 1:], tokens, rtol=1e-4, atol=1e-5)


def test_extend_attention_mask_values():
    m = extend_attention_mask(torch.tensor([[1, 0]]), torch.float32)
    assert m.shape == (1, 1, 1, 2) and m.tolist() == [[[[0.0, -10000.0]]]]
    assert math.isclose(float(m.min()), -10000.0)
