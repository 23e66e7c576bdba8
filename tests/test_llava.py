"""The llava adapter on a tiny random-init LlavaForConditionalGeneration (CLIP tower, Llama decoder).

Every method that runs on it: exact restore, identity and token-identical generation at zero
reduction, token counts that shrink, batched == one by one, KV-cache lengths, eager == sdpa kept
sets, and clear errors for what is not supported.
"""
import pytest
import torch

import pumer_plug
from tests.backbones import BACKBONES
from tests.llava_backbone import IMAGE_TOKEN, LLAVA_METHOD_CONFIGS, build_llava, llava_batch, split_rows

METHODS = sorted(LLAVA_METHOD_CONFIGS)
NUM_LAYERS = 4
V = 64


def reducing(method):
    return LLAVA_METHOD_CONFIGS[method][0](NUM_LAYERS - 1, ("text", "image"))


def zero(method):
    return LLAVA_METHOD_CONFIGS[method][1](NUM_LAYERS - 1, ("text", "image"))


def last_logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits[:, -1]


def generate(model, batch, n=6):
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[:, batch["input_ids"].shape[1]:]


def snapshot(model):
    return {name: (type(m), sorted(vars(m)), dict(m._forward_hooks), dict(m._forward_pre_hooks))
            for name, m in model.named_modules()}


@pytest.fixture(scope="module")
def model():
    return build_llava(NUM_LAYERS)


@pytest.mark.parametrize("method", METHODS)
def test_remove_restores_the_model_exactly(model, method):
    batch = llava_batch()
    ref = last_logits(model, batch)
    before, state = snapshot(model), model.state_dict(keep_vars=True)
    handle = pumer_plug.apply(model, adapter="llava", method=method, config=reducing(method))
    reduced = last_logits(model, batch)
    assert not torch.allclose(reduced, ref, atol=1e-6), "a reducing config left the outputs unchanged"
    handle.remove()
    handle.remove()
    assert snapshot(model) == before
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(state) and all(after[k] is state[k] for k in state)
    torch.testing.assert_close(last_logits(model, batch), ref, atol=0, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_zero_reduction_generates_the_same_tokens(model, method):
    for batch in (split_rows(llava_batch())[0], llava_batch()):  # batch 1, left-padded batch 2
        ref = generate(model, batch)
        with pumer_plug.apply(model, adapter="llava", method=method, config=zero(method)):
            out = generate(model, batch)
        assert torch.equal(out, ref)


@pytest.mark.parametrize("method", METHODS)
def test_token_counts_really_shrink(model, method):
    with pumer_plug.apply(model, adapter="llava", method=method, config=reducing(method)) as handle:
        last_logits(model, llava_batch())
        counts = handle.token_counts
    assert counts and all(c.image < V for c in counts.values())
    images = [c.image for _, c in sorted(counts.items())]
    assert images == sorted(images, reverse=True)


def test_budgets_keep_the_configured_tokens(model):
    # pumer, k=0.4, r=0.2 at two points: 64 - 26 pruned - 13 merged = 25, then 25 - 10 - 5 = 10
    keep = {"fastv": 24, "random": 32, "pool": 16, "pumer": 10}
    for method, expected in keep.items():
        with pumer_plug.apply(model, adapter="llava", method=method, config=reducing(method)) as handle:
            last_logits(model, llava_batch())
            assert min(c.image for c in handle.token_counts.values()) == expected, method


@pytest.mark.parametrize("method", METHODS)
def test_batched_generation_equals_one_by_one(model, method):
    batch = llava_batch()
    with pumer_plug.apply(model, adapter="llava", method=method, config=reducing(method)):
        batched = generate(model, batch)
        alone = [generate(model, row)[0] for row in split_rows(batch)]
        again = generate(model, batch)  # repeated generate calls on one handle
    assert torch.equal(batched, torch.stack(alone))
    assert torch.equal(again, batched)


@pytest.mark.parametrize("method", ["fastv", "pumer", "pool"])
def test_kv_cache_lengths_per_layer(model, method):
    batch = llava_batch()
    N = batch["input_ids"].shape[1]
    with pumer_plug.apply(model, adapter="llava", method=method, config=reducing(method)) as handle:
        with torch.no_grad():
            cache = model(**batch, use_cache=True).cache
        counts = handle.token_counts
    lengths = [cache.get_seq_length(i) for i in range(NUM_LAYERS)]
    if method == "pool":
        assert lengths == [N - (V - counts[0].image)] * NUM_LAYERS
        return
    expected, n = [], N
    for layer in range(NUM_LAYERS):
        expected.append(n)
        if layer in counts:
            n = N - (V - counts[layer].image)
    assert lengths == expected


def test_decode_positions_continue_from_the_unreduced_length(model):
    batch = split_rows(llava_batch())[0]
    N = batch["input_ids"].shape[1]
    seen = []
    last = model.model.language_model.layers[-1]
    with pumer_plug.apply(model, adapter="llava", method="fastv", config=reducing("fastv")) as handle:
        # registered after the adapter's pre-hook, so it sees what the layer receives
        hook = last.register_forward_pre_hook(lambda m, a, k: seen.append(k["position_ids"].clone()), with_kwargs=True)
        try:
            generate(model, batch, n=3)
        finally:
            hook.remove()
        kept = handle.token_counts[1].image
    prefill, *decode = seen
    assert prefill.shape[-1] == N - (V - kept) and prefill[0, -1] == N - 1  # survivors keep their positions
    assert [int(p) for p in decode] == [N, N + 1]


@pytest.mark.parametrize("method", ["fastv", "pumer"])
def test_eager_and_sdpa_keep_the_same_tokens(method):
    kept, tokens = {}, {}
    for attn in ("eager", "sdpa"):
        model = build_llava(NUM_LAYERS, attn=attn)
        with pumer_plug.apply(model, adapter="llava", method=method, config=reducing(method)) as handle:
            last_logits(model, llava_batch())
            kept[attn] = [index.clone() for _, index in handle.adapter.state.stages]
            tokens[attn] = generate(model, llava_batch())
            assert model.config.text_config._attn_implementation == attn  # scores never switch the kernel
    assert len(kept["sdpa"]) >= 1
    assert all(torch.equal(a, b) for a, b in zip(kept["eager"], kept["sdpa"]))
    assert torch.equal(tokens["eager"], tokens["sdpa"])


@pytest.mark.parametrize("method", ["fastv", "random"])
def test_pruning_equals_masking_the_pruned_keys(method):
    """Pruned after layer K - 1 == the unplugged model with those keys masked out from layer K on:
    survivors keep their RoPE positions and every later layer gets a consistent mask."""
    model = build_llava(NUM_LAYERS, attn="eager")
    batch = llava_batch()
    with pumer_plug.apply(model, adapter="llava", method=method, config=reducing(method)) as handle:
        out = last_logits(model, batch)
        (after, kept), = handle.adapter.state.stages  # (B, N') original positions of the kept tokens
    keep = torch.zeros(batch["input_ids"].shape, dtype=torch.bool).scatter_(1, kept, True)

    def mask_pruned(module, args, kwargs):
        mask = kwargs["attention_mask"]  # (B, 1, N, N) additive
        return args, {**kwargs, "attention_mask": mask.masked_fill(~keep[:, None, None, :], torch.finfo(mask.dtype).min)}

    layers = model.model.language_model.layers
    hooks = [layers[i].register_forward_pre_hook(mask_pruned, with_kwargs=True) for i in range(after + 1, NUM_LAYERS)]
    try:
        ref = last_logits(model, batch)
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_forward_without_image_tokens_is_unreduced(model):
    batch = {"input_ids": torch.tensor([[1, 5, 6, 7, 8]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    ref = last_logits(model, batch)
    with pumer_plug.apply(model, adapter="llava", method="fastv", config=reducing("fastv")) as handle:
        last_logits(model, llava_batch())
        out = last_logits(model, batch)
        assert handle.token_counts == {}
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


# -- errors ---------------------------------------------------------------------------------------
def test_layer_beyond_depth_is_refused_at_apply(model):
    from pumer_plug.baselines.fastv import FastVConfig

    with pytest.raises(ValueError, match="layer K=4 is beyond the decoder"):
        pumer_plug.apply(model, adapter="llava", method="fastv", config=FastVConfig(layer=NUM_LAYERS))
    with pytest.raises(ValueError, match="beyond"):
        pumer_plug.apply(model, adapter="llava", method="pumer",
                         config=pumer_plug.PumerConfig(reduction_layers=(3,), text_merge_ratio=0.0))
    last_logits(model, llava_batch())  # nothing left attached


def test_keep_count_above_the_image_tokens_fails_at_forward_start(model):
    from pumer_plug.baselines.fastv import FastVConfig

    with pumer_plug.apply(model, adapter="llava", method="fastv", config=FastVConfig(keep_tokens=V + 1)):
        with pytest.raises(ValueError, match="keep_tokens=65 exceeds the 64 image tokens"):
            last_logits(model, llava_batch())


@pytest.mark.parametrize("method", ["pumer", "fastv"])
def test_labels_in_a_reduced_prefill_are_refused_and_the_last_logits_stay_usable(model, method):
    batch = llava_batch()
    with pumer_plug.apply(model, adapter="llava", method=method, config=reducing(method)):
        with pytest.raises(ValueError, match="labels= in a reduced prefill"):
            model(**batch, labels=batch["input_ids"])
        logits = model(**batch).logits
    assert logits.shape[1] < batch["input_ids"].shape[1]  # the kept positions only
    model(**batch, labels=batch["input_ids"])  # without the handle: the loss as usual


def test_bad_config_values_are_refused():
    from pumer_plug.baselines.fastv import FastVConfig
    from pumer_plug.baselines.pool import PoolConfig

    for bad in ({"layer": 0}, {"prune_ratio": 1.0}, {"keep_tokens": 0}, {"keep_tokens": 1.5}):
        with pytest.raises(ValueError, match="FastVConfig"):
            FastVConfig(**bad)
    with pytest.raises(ValueError, match="PoolConfig.stride"):
        PoolConfig(stride=0)
    assert FastVConfig.preset("keep128").keep_tokens == 128


def test_text_merging_and_proportional_attention_are_refused_on_decoders(model):
    with pytest.raises(ValueError, match="merges text tokens"):
        pumer_plug.apply(model, adapter="llava", method="pumer", config=pumer_plug.PumerConfig(reduction_layers=(1,)))
    with pytest.raises(ValueError, match="proportional attention"):
        pumer_plug.apply(model, adapter="llava", method="pumer",
                         config=pumer_plug.PumerConfig.preset("llava-keep64", proportional_attention=True))


def test_llava_model_without_lm_head(model):
    inner = model.model
    batch = llava_batch()
    with pumer_plug.apply(inner, adapter="auto", method="fastv", config=reducing("fastv")) as handle:
        with torch.no_grad():
            out = inner(**batch).last_hidden_state
        assert handle.adapter.name == "llava" and out.shape[1] == batch["input_ids"].shape[1] - (V - 24)


@pytest.mark.parametrize("method,adapter", [("pool", "vilt"), ("fastv", "vilt"), ("tome", "llava"), ("smres", "llava")])
def test_pairs_without_a_common_placement_fail_at_apply(method, adapter):
    model = BACKBONES[adapter].build()
    with pytest.raises(ValueError, match=f"method '{method}'") as err:
        pumer_plug.apply(model, adapter=adapter, method=method)
    assert adapter in str(err.value)  # names both
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_several_images_per_prompt_fail_at_forward(model):
    batch = split_rows(llava_batch(num_image=32))[0]
    ids = batch["input_ids"]
    two = torch.cat([ids[:, :4], torch.tensor([[7]]), ids[:, 4:]], dim=1)  # splits the image run in two
    with pumer_plug.apply(model, adapter="llava", method="fastv", config=reducing("fastv")):
        with pytest.raises(ValueError, match="several image-token runs; one image per sample"):
            model(input_ids=two, attention_mask=torch.ones_like(two), pixel_values=torch.randn(2, 3, 32, 32))
    assert (two == IMAGE_TOKEN).sum() == 32


def test_attention_kernels_without_4d_masks_are_refused():
    model = build_llava(NUM_LAYERS)
    model.config.text_config._attn_implementation = "flash_attention_2"  # not run: only the check is tested
    with pytest.raises(ValueError, match="'flash_attention_2' attention; supported: 'sdpa' and 'eager'"):
        pumer_plug.apply(model, adapter="llava", method="fastv")


# -- decode steps whose token is the image token id ------------------------------------------------
class ForceImageToken:
    """A logits processor that makes the first generated token the image token id."""

    def __init__(self, prompt_length: int):
        self.prompt_length = prompt_length

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.prompt_length:
            scores = torch.full_like(scores, float("-inf"))
            scores[:, IMAGE_TOKEN] = 0.0
        return scores


def generate_through_image_token(model, batch, n=4):
    from transformers import LogitsProcessorList

    processors = LogitsProcessorList([ForceImageToken(batch["input_ids"].shape[1])])
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=n, do_sample=False, pad_token_id=0, logits_processor=processors)
    return out[:, batch["input_ids"].shape[1]:]


@pytest.mark.parametrize("method", METHODS)
def test_a_decode_step_on_the_image_token_id_is_a_decode_step(model, method):
    """The second decode step's input is the image token id: it stays a decode step on the prefill's
    cache (dense == zero reduction; a reducing method neither fails nor starts a new prompt)."""
    batch = llava_batch()
    ref = generate_through_image_token(model, batch)
    assert (ref[:, 0] == IMAGE_TOKEN).all()
    with pumer_plug.apply(model, adapter="llava", method=method, config=zero(method)):
        assert torch.equal(generate_through_image_token(model, batch), ref)
    with pumer_plug.apply(model, adapter="llava", method=method, config=reducing(method)) as handle:
        out = generate_through_image_token(model, batch)
        assert (out[:, 0] == IMAGE_TOKEN).all() and min(c.image for c in handle.token_counts.values()) < V


@pytest.mark.parametrize("method", ["fastv", "random"])
def test_decode_step_on_the_image_token_id_equals_masking_the_pruned_keys(method):
    """Prefill pruned, then one decode step whose token is the image token id == the unplugged model
    with the pruned prompt keys masked out from layer K on, in the prefill and in that decode step."""
    model = build_llava(NUM_LAYERS, attn="eager")
    batch = llava_batch()
    step = torch.full((2, 1), IMAGE_TOKEN)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(step)], dim=1)

    def prefill_and_step():
        with torch.no_grad():
            cache = model(**batch, use_cache=True).cache
            return model(input_ids=step, attention_mask=mask, cache=cache, use_cache=True).logits[:, -1]

    with pumer_plug.apply(model, adapter="llava", method=method, config=reducing(method)) as handle:
        out = prefill_and_step()
        (after, kept), = handle.adapter.state.stages
    N = batch["input_ids"].shape[1]
    keep = torch.zeros(2, N + 1, dtype=torch.bool).scatter_(1, kept, True)
    keep[:, N] = True  # the decode step's own token

    def mask_pruned(module, args, kwargs):
        m = kwargs["attention_mask"]  # (B, 1, q, L) additive
        return args, {**kwargs, "attention_mask": m.masked_fill(~keep[:, None, None, : m.shape[-1]], torch.finfo(m.dtype).min)}

    layers = model.model.language_model.layers
    hooks = [layers[i].register_forward_pre_hook(mask_pruned, with_kwargs=True) for i in range(after + 1, NUM_LAYERS)]
    try:
        ref = prefill_and_step()
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_image_tokens_continuing_an_unreduced_cache_are_refused(model):
    batch = split_rows(llava_batch())[0]
    with torch.no_grad():
        cache = model(input_ids=torch.tensor([[1, 5]]), use_cache=True).cache  # filled without the handle
    with pumer_plug.apply(model, adapter="llava", method="fastv", config=reducing("fastv")):
        with pytest.raises(ValueError, match="continue a cache of 2 tokens that this handle did not fill"):
            model(**batch, cache=cache)
