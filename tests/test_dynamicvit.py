"""DynamicViT baseline: schedule, predictor, train-mode masked attention, losses, predictor files, low precision."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import pumer_plug
from pumer_plug.baselines.dynamicvit import (
    DynamicViT,
    DynamicViTConfig,
    PredictorLG,
    distillation_loss,
    gumbel_keep,
    keep_count,
    keep_ratio_loss,
    POLICY_EPS,
    policy_sizes,
    token_distillation_loss,
)
from pumer_plug.ops.reduce import attention_bias
from pumer_plug.state import ForwardState
from pumer_plug.stream import IMAGE, TEXT, Segment, TokenStream
from tests.backbones import BACKBONES, build_vilt, vilt_batch


# -- config and schedule -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(keep_ratio=0.0), "keep_ratio"),
        (dict(keep_ratio=1.5), "keep_ratio"),
        (dict(keep_ratio=True), "keep_ratio"),
        (dict(keep_ratio=float("nan")), "keep_ratio"),
        (dict(tau=0.0), "tau"),
        (dict(tau=float("inf")), "tau"),
        (dict(embed_dim=2), "embed_dim"),
        (dict(embed_dim=64.0), "embed_dim"),
        (dict(reduction_layers=(6, 3)), "reduction_layers"),
        (dict(reduction_layers=()), "reduction_layers"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"DynamicViTConfig.{field}"):
        DynamicViTConfig(**kwargs)


def test_schedule_matches_dynamicvit_token_ratio():
    # DynamicViT main.py: KEEP_RATE = [rho, rho**2, rho**3]; eval keeps int(196 * KEEP_RATE[s]) patches
    config = DynamicViTConfig.preset("deit")
    assert config.reduction_layers == (2, 5, 8) and config.keep_ratio == 0.7
    assert config.token_schedule(197) == [1 + int(196 * 0.7), 1 + int(196 * 0.7**2), 1 + int(196 * 0.7**3)]
    assert config.token_schedule(197) == [138, 97, 68]
    assert keep_count(100, 0.7**2) == 48  # as DynamicViT: int(100 * 0.7 ** 2) = int(48.99999999999999)
    assert DynamicViTConfig.preset("vilt").reduction_layers == (3, 6, 9)
    with pytest.raises(ValueError, match="known presets"):
        DynamicViTConfig.preset("nope")
    assert DynamicViTConfig(reduction_layers=[1, 2]).reduction_layers == (1, 2)
    assert DynamicViTConfig(keep_ratio=1.0).is_identity


# -- pure functions --------------------------------------------------------------------------------
def test_predictor_pools_the_global_feature_over_the_policy_only():
    torch.manual_seed(0)
    predictor = PredictorLG(16)
    x, policy = torch.randn(2, 7, 16), (torch.rand(2, 7, 1) > 0.4).float()
    out = predictor(x, policy)
    assert out.shape == (2, 7, 2) and torch.allclose(out.exp().sum(-1), torch.ones(2, 7))
    for b in range(2):  # loop reference: dyvit.py PredictorLG.forward row by row
        h = predictor.in_conv(x[b])  # (n, C)
        kept = h[policy[b, :, 0] > 0, 8:]
        glob = kept.mean(0) if len(kept) else torch.zeros(8)
        ref = predictor.out_conv(torch.cat([h[:, :8], glob.expand(7, 8)], dim=-1))
        torch.testing.assert_close(out[b], ref, atol=1e-5, rtol=1e-5)
    x2 = x.clone()
    x2[policy[..., 0] == 0] = 100.0  # dropped tokens change only their own (local) score
    keep = policy[..., 0] > 0
    torch.testing.assert_close(predictor(x2, policy)[keep], out[keep])
    assert torch.isfinite(predictor(x, torch.zeros(2, 7, 1))).all()  # empty policy: no 0 / 0


def test_gumbel_keep_is_hard_with_a_straight_through_gradient():
    torch.manual_seed(0)
    log_probs = torch.randn(3, 50, 2).log_softmax(-1).requires_grad_()
    keep = gumbel_keep(log_probs, tau=0.5)
    assert keep.shape == (3, 50, 1) and set(keep.unique().tolist()) <= {0.0, 1.0}
    keep.sum().backward()
    assert log_probs.grad.abs().sum() > 0
    sure = torch.tensor([[[0.0, -60.0], [-60.0, 0.0]]]).to(torch.bfloat16)  # keep, drop
    assert gumbel_keep(sure).flatten().tolist() == [1.0, 0.0]


def softmax_with_policy(attn, policy, eps=POLICY_EPS):
    """DynamicViT ``Attention.softmax_with_policy`` (models/dyvit.py), restated as the reference:
    softmax over the kept keys and self, with the eps trick against empty rows."""
    B, H, N, _ = attn.shape
    attn_policy = policy.reshape(B, 1, 1, N)
    eye = torch.eye(N, dtype=attn_policy.dtype).view(1, 1, N, N)
    attn_policy = attn_policy + (1.0 - attn_policy) * eye
    max_att = torch.max(attn, dim=-1, keepdim=True)[0]
    attn = attn - max_att
    attn = attn.to(torch.float32).exp_() * attn_policy.to(torch.float32)
    attn = (attn + eps / N) / (attn.sum(dim=-1, keepdim=True) + eps)
    return attn.type_as(max_att)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_proportional_attention_with_policy_sizes_is_softmax_with_policy(dtype):
    torch.manual_seed(0)
    B, H, N = 2, 3, 9
    logits = torch.randn(B, H, N, N) * 3
    policy = (torch.rand(B, N, 1) > 0.5).float()
    policy[:, 0] = 1.0  # a protected CLS is always kept
    bias = attention_bias(torch.ones(B, N, dtype=torch.bool), policy_sizes(policy), dtype, proportional=True)
    ours = (logits.to(dtype) + bias).softmax(dim=-1).float()  # what an adapter computes in train mode
    ref = softmax_with_policy(logits.to(dtype), policy.to(dtype)).float()
    kept = policy[:, :, 0] > 0  # queries whose outputs anything reads
    tol = 1e-4 if dtype == torch.float32 else 1e-2  # the two eps placements differ by ~eps / kept mass
    torch.testing.assert_close(ours.permute(0, 2, 1, 3)[kept], ref.permute(0, 2, 1, 3)[kept], atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_an_empty_keep_policy_gives_no_nan(dtype):
    logits = (torch.randn(2, 2, 6, 6) * 30).to(dtype).requires_grad_()
    policy = torch.zeros(2, 6, 1, requires_grad=True)  # every key dropped
    ref = softmax_with_policy(logits, policy.to(dtype))
    bias = attention_bias(torch.ones(2, 6, dtype=torch.bool), policy_sizes(policy), dtype, proportional=True)
    ours = (logits + bias).softmax(dim=-1)
    (ref.float().sum() + ours.float().square().sum()).backward()
    assert torch.isfinite(ref).all() and torch.isfinite(ours).all()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(policy.grad).all()


def test_losses_follow_dynamicvit():
    student, teacher = torch.randn(4, 5), torch.randn(4, 5)
    ref = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), reduction="batchmean", log_target=True)
    torch.testing.assert_close(distillation_loss(student, teacher), ref)
    assert distillation_loss(teacher, teacher, tau=2.0).abs() < 1e-6
    tokens, keep = torch.randn(2, 3, 4), torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    teacher_tokens = torch.randn(2, 3, 4)
    chosen = keep.bool()
    torch.testing.assert_close(token_distillation_loss(tokens, teacher_tokens, keep),
                               (tokens[chosen] - teacher_tokens[chosen]).pow(2).mean())
    assert token_distillation_loss(tokens, teacher_tokens, torch.zeros(2, 3)) == 0


# -- reduce on a hand-built stream -----------------------------------------------------------------
def vl_stream(hidden_dim=16, seed=0):
    """[text (4) | image CLS + 10 patches], row 1 has 6 real patches and 2 text tokens."""
    g = torch.Generator().manual_seed(seed)
    text = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    image = torch.tensor([[1] * 11, [1] * 7 + [0] * 4], dtype=torch.bool)
    mask = torch.cat([text, image], dim=1)
    protected = torch.zeros_like(mask)
    protected[:, [0, 4]] = True
    stream = TokenStream(mask, protected, [Segment(TEXT, 4, 1), Segment(IMAGE, 11, 1)], [(4, 2), (11, 7)])
    stream.hidden = torch.randn(2, 15, hidden_dim, generator=g)
    return stream


def test_eval_keeps_floor_rho_s_of_the_starting_image_tokens_per_row():
    torch.manual_seed(0)
    method = DynamicViT(DynamicViTConfig(reduction_layers=(0, 1), keep_ratio=0.7, embed_dim=16))
    method.on_forward_start(ForwardState())
    stream = vl_stream()
    hidden = stream.hidden
    scores = method.modules()["0"](hidden[:, 4:], (stream.mask & ~stream.protected)[:, 4:, None].float())[..., 0]
    plan = method.reduce(0, stream)
    assert stream.lengths == [(4, 2), (1 + 7, 1 + 4)]  # floor(0.7 * 10) = 7, floor(0.7 * 6) = 4
    assert stream.segments == [Segment(TEXT, 4, 1), Segment(IMAGE, 8, 1)]
    assert plan.num_out == 12
    kept = plan.dest[:, 4:] < plan.num_out  # (B, 11)
    assert kept[:, 0].all()  # image CLS
    for b, n in ((0, 10), (1, 6)):
        top = scores[b, 1 : 1 + n].argsort(descending=True)[: (7, 4)[b]] + 1
        assert sorted(kept[b].nonzero().flatten().tolist()) == [0] + sorted(top.tolist())
    stream.hidden = torch.randn(2, 12, 16)
    method.reduce(1, stream)
    assert stream.lengths[1] == (1 + 4, 1 + 2)  # floor(0.49 * 10), floor(0.49 * 6): of V0, not of what is left


def test_train_keeps_shapes_and_writes_the_cumulative_policy_into_sizes():
    torch.manual_seed(0)
    method = DynamicViT(DynamicViTConfig(reduction_layers=(0, 1), keep_ratio=0.5, embed_dim=16))
    method.on_forward_start(ForwardState(training=True))
    stream = vl_stream()
    stream.bias_cache = torch.zeros(1)
    plan = method.reduce(0, stream)
    assert plan.is_identity and stream.num_tokens == 15 and stream.lengths == [(4, 2), (11, 7)]
    assert stream.bias_cache is None
    size = stream.size[..., 0]
    first = method.decisions[0].keep
    candidates = stream.mask & ~stream.protected
    assert size[:, :4].eq(1).all() and size[:, 4].eq(1).all() and size[1, 11:].eq(1).all()  # text, CLS, padding
    image = candidates[:, 4:]
    torch.testing.assert_close(size[:, 4:][image], policy_sizes(first[image][:, None])[:, 0])
    stream.hidden = torch.randn(2, 15, 16)
    method.reduce(1, stream)
    second = method.decisions[1].keep
    assert (second <= first).all() and method.decisions[1].target == 0.25  # dropped tokens stay dropped
    loss = keep_ratio_loss(method)
    manual = sum(((d.keep * d.valid).sum(1) / d.valid.sum(1) - d.target).pow(2).mean() for d in method.decisions) / 2
    torch.testing.assert_close(loss, manual)
    loss.backward()
    assert all(p.grad is not None for p in method.modules().parameters())


def test_keep_ratio_one_is_the_identity_and_builds_nothing():
    method = DynamicViT(DynamicViTConfig(reduction_layers=(0,), keep_ratio=1.0))
    method.on_forward_start(ForwardState())
    stream = vl_stream()
    assert method.reduce(0, stream).is_identity and method.modules() is None
    with pytest.raises(RuntimeError, match="no train-mode keep decisions"):
        keep_ratio_loss(method)


# -- on a model ------------------------------------------------------------------------------------
def test_predictors_belong_to_the_method_and_round_trip_through_safetensors(tmp_path):
    model, batch = build_vilt(), vilt_batch()
    keys = list(model.state_dict())
    config = DynamicViTConfig(reduction_layers=(0, 2), keep_ratio=0.5)
    with pumer_plug.apply(model, adapter="vilt", method="dynamicvit", config=config) as handle:
        assert handle.method.modules() is not None  # built by apply() at the adapter's hidden_size
        with torch.no_grad():
            ref = model(**batch).logits
        predictors = handle.method.modules()
        assert set(predictors) == {"0", "2"} and predictors["0"].in_conv[1].in_features == 64
        assert list(model.state_dict()) == keys
        assert not any(p is q for p in model.parameters() for q in predictors.parameters())
        save_file(handle.method.state_dict(), str(tmp_path / "pred.safetensors"))
    saved = load_file(str(tmp_path / "pred.safetensors"))
    with pumer_plug.apply(model, adapter="vilt", method="dynamicvit", config=config) as handle:
        handle.method.load_state_dict(saved)
        with torch.no_grad():
            torch.testing.assert_close(model(**batch).logits, ref, atol=0, rtol=0)
    other = DynamicViT(dataclasses.replace(config, reduction_layers=(0, 1)))
    with pytest.raises(ValueError, match="reduction_layers"):
        other.load_state_dict(saved)
    with pytest.raises(ValueError, match="width"):
        DynamicViT(dataclasses.replace(config, embed_dim=32)).load_state_dict(saved)
    with pytest.raises(ValueError, match="embed_dim"):
        with pumer_plug.apply(model, adapter="vilt", method="dynamicvit", config=dataclasses.replace(config, embed_dim=32)):
            model(**batch)


@pytest.mark.parametrize("name", ["vilt", "timm-vit"])
def test_train_mode_masking_equals_eval_mode_pruning(name):
    """With the same decisions, masked attention (train) and real removal (eval) give the same outputs."""
    backbone = BACKBONES[name]
    model, batch = backbone.build(), backbone.make_batch()
    config = DynamicViTConfig(reduction_layers=(1,), keep_ratio=0.5)
    with pumer_plug.apply(model, adapter=name, method="dynamicvit", config=config) as handle:
        with torch.no_grad():
            pruned = backbone.logits(model(**batch))

        def top_half(log_probs, prev):  # the eval rule instead of Gumbel samples
            scores = log_probs[..., 0].masked_fill(prev[..., 0] == 0, -torch.inf)
            count = int(prev[0].sum()) // 2  # floor(0.5 * V0), every row has the same V0 here
            rank = scores.argsort(dim=1, descending=True).argsort(dim=1)
            return (rank < count).float().unsqueeze(-1) * prev

        handle.method._decide = top_half
        model.train()
        with torch.no_grad():
            masked = backbone.logits(model(**batch))
        stream = next(iter(handle.streams.values()))
        assert stream.size is not None and (stream.size < 0.5).sum() > 0  # tokens really masked, none removed
    torch.testing.assert_close(masked, pruned, atol=1e-4, rtol=1e-4)


def test_train_mode_gradients_reach_predictors_and_loss_targets():
    model, batch = build_vilt(), vilt_batch()
    model.train()
    with pumer_plug.apply(model, adapter="vilt", method="dynamicvit",
                          config=DynamicViTConfig(reduction_layers=(0, 2), keep_ratio=0.5)) as handle:
        torch.manual_seed(0)
        logits = model(**batch).logits
        with torch.no_grad():
            teacher = logits + torch.randn_like(logits)
        loss = logits.square().mean() + 2.0 * keep_ratio_loss(handle.method) + distillation_loss(logits, teacher)
        loss.backward()
        assert [d.layer for d in handle.method.decisions] == [0, 2]
        assert handle.token_counts[2].image == 25  # no removal in train mode
        grads = [p.grad for p in handle.method.modules().parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_with_an_almost_empty_keep_mask_has_no_nan(dtype):
    model, batch = build_vilt(), vilt_batch()
    model.to(dtype).train()
    batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
    config = DynamicViTConfig(reduction_layers=(0, 2), keep_ratio=0.5, embed_dim=64)
    with pumer_plug.apply(model, adapter="vilt", method="dynamicvit", config=config) as handle:
        predictors = handle.method.modules().to(dtype)
        for p in predictors.values():
            p.out_conv[-2].bias.data = torch.tensor([-30.0, 30.0], dtype=dtype)  # drop every image token
        logits = model(**batch).logits
        logits.float().square().sum().backward()
        assert all(d.keep.sum() == 0 for d in handle.method.decisions)
        assert torch.isfinite(logits).all()
        grads = [p.grad for p in list(model.parameters()) + list(predictors.parameters()) if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        model.eval()
        with torch.no_grad():
            assert torch.isfinite(model(**batch).logits).all()


def test_rows_with_fewer_real_patches_keep_their_own_count():
    model = build_vilt()
    batch = vilt_batch()
    pixel_mask = torch.ones(3, 64, 96, dtype=torch.long)
    pixel_mask[1, :, 48:] = 0  # row 1: 4 x 3 real patches instead of 4 x 6
    batch["pixel_mask"] = pixel_mask
    with pumer_plug.apply(model, adapter="vilt", method="dynamicvit",
                          config=DynamicViTConfig(reduction_layers=(0, 2), keep_ratio=0.5)) as handle:
        with torch.no_grad():
            model(**batch)
        image = handle.streams["vilt"].lengths[1]
    assert image == (1 + 6, 1 + 3, 1 + 6)  # floor(0.25 * 24), floor(0.25 * 12)


def test_untrained_predictors_are_the_same_on_every_attach_and_leave_the_global_rng_alone():
    """Plug-and-play DynamicViT reproduces: two attaches build identical predictors (a new user saw its
    compare accuracy change between runs), and building them does not move torch's global RNG."""
    from pumer_plug.baselines.dynamicvit import DynamicViT
    from pumer_plug.baselines.dynamicvit_config import DynamicViTConfig

    first, second = DynamicViT(DynamicViTConfig(reduction_layers=(1, 2))), DynamicViT(DynamicViTConfig(reduction_layers=(1, 2)))
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first._build(16)
    torch.rand(5)  # the RNG moves between the two builds
    second._build(16)
    for a, b in zip(first.modules().state_dict().values(), second.modules().state_dict().values()):
        assert torch.equal(a, b)
    torch.manual_seed(123)
    first._build(16)
    assert torch.equal(torch.rand(1), before)
