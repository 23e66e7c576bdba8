"""ToMe baseline: r schedules against ToMe's ``parse_r``, the capped merge count, cross-modal merging."""
import dataclasses

import pytest
import torch

import pumer_plug
from pumer_plug.state import ForwardState
from pumer_plug.baselines.tome import Tome, TomeConfig, merge_cap
from pumer_plug.stream import IMAGE, MIXED, TEXT, Segment, TokenStream
from tests.backbones import BACKBONES


def tome_parse_r(num_layers, r):
    """``tome.utils.parse_r`` (facebookresearch/ToMe), restated as the reference."""
    inflect = 0
    if isinstance(r, list):
        if len(r) < num_layers:
            r = r + [0] * (num_layers - len(r))
        return list(r)
    elif isinstance(r, tuple):
        r, inflect = r
    min_val = int(r * (1.0 - inflect))
    max_val = 2 * r - min_val
    step = (max_val - min_val) / (num_layers - 1)
    return [int(min_val + step * i) for i in range(num_layers)]


@pytest.mark.parametrize("num_layers", [2, 4, 12, 24])
@pytest.mark.parametrize("r", [0, 1, 5, 8, 16, (8, -1.0), (13, -0.5), (8, 0.25), (16, 1.0), [3, 0, 2], [1] * 4])
def test_schedule_matches_tome_parse_r(r, num_layers):
    config = TomeConfig.from_tome(r)
    if isinstance(r, list) and len(r) > num_layers:  # ToMe ignores the extra layers; we refuse them
        with pytest.raises(ValueError, match="beyond"):
            config.schedule(num_layers)
        return
    assert list(config.schedule(num_layers)) == tome_parse_r(num_layers, r)


def test_schedule_of_one_layer_is_r():
    assert TomeConfig(r=5, inflection=-1.0).schedule(1) == (10,)  # ToMe divides by zero here
    assert TomeConfig(r=5).schedule(1) == (5,)


def test_explicit_reduction_layers_mask_the_schedule():
    config = TomeConfig(r=4, inflection=-1.0, reduction_layers=(1, 3))
    assert config.schedule(4) == (0, 5, 0, 0)  # parse_r: 8, 5, 2, 0
    method = Tome(config)
    assert method.reduction_layers(4) == (1,)
    with pytest.raises(ValueError, match="beyond"):
        Tome(dataclasses.replace(config, reduction_layers=(4,))).reduction_layers(4)


def test_per_layer_r_longer_than_the_model_is_refused():
    with pytest.raises(ValueError, match="TomeConfig.r lists 5 layers, beyond"):
        Tome(TomeConfig(r=[1, 1, 1, 1, 1])).reduction_layers(4)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(r=-1), "TomeConfig.r"),
        (dict(r=1.5), "TomeConfig.r"),
        (dict(r=True), "TomeConfig.r"),
        (dict(r=[2, -1]), "TomeConfig.r"),
        (dict(r=[2, 0.5]), "TomeConfig.r"),
        (dict(inflection=2.0), "TomeConfig.inflection"),
        (dict(inflection=float("nan")), "TomeConfig.inflection"),
        (dict(r=[1, 2], inflection=-1.0), "TomeConfig.inflection"),
        (dict(reduction_layers=(3, 1)), "TomeConfig.reduction_layers"),
        (dict(reduction_layers=(-1,)), "TomeConfig.reduction_layers"),
        (dict(proportional_attention=1), "TomeConfig.proportional_attention"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TomeConfig(**kwargs)


def test_config_is_frozen_hashable_and_normalised():
    config = TomeConfig(r=[2, 1])
    assert config.r == (2, 1) and hash(config) == hash(TomeConfig(r=(2, 1)))
    assert dataclasses.replace(config, proportional_attention=False).r == (2, 1)
    assert TomeConfig(r=0).is_identity and TomeConfig(r=[0, 0]).is_identity and not TomeConfig(r=1).is_identity
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.r = 3


def test_merge_cap_is_half_the_mergeable_tokens():
    assert merge_cap(197, 16, 1) == 16
    assert merge_cap(21, 16, 1) == 10  # (21 - 1) // 2
    assert merge_cap(4, 16, 2) == 1
    assert merge_cap(2, 16, 1) == 0 and merge_cap(1, 3, 1) == 0
    assert TomeConfig(r=16).token_schedule(197, 12) == [181, 165, 149, 133, 117, 101, 85, 69, 53, 37, 21, 11]


def image_stream(B=2, N=9, C=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, N, dtype=torch.bool)
    protected = torch.zeros_like(mask)
    protected[:, 0] = True
    stream = TokenStream(mask, protected, [Segment(IMAGE, N, 1)], [(N,) * B])
    stream.keys = torch.randn(B, N, C, generator=g)
    return stream


def test_reduce_caps_r_and_reports_the_effective_r():
    method = Tome(TomeConfig(r=[3, 10]))
    assert method.reduction_layers(2) == (0, 1)
    method.on_forward_start(ForwardState())
    stream = image_stream(N=9)
    plan = method.reduce(0, stream)
    assert plan.num_out == 6 and stream.segments == [Segment(IMAGE, 6, 1)]
    stream.keys = torch.randn(2, 6, 8)
    method.reduce(1, stream)  # 5 mergeable tokens: at most 2 merge
    assert method.effective_r == {0: [(3, 3)], 1: [(2, 2)]}
    assert stream.real_counts() == (4, 4) and stream.sizes().sum(dim=1).flatten().tolist() == [9.0, 9.0]
    assert stream.protected[:, 0].all() and stream.sizes()[:, 0].eq(1).all()  # CLS never merges
    method.on_forward_start(ForwardState())
    assert method.effective_r == {}


def test_reduce_without_keys_raises():
    method = Tome(TomeConfig(r=2))
    method.reduction_layers(4)
    stream = image_stream()
    stream.keys = None
    with pytest.raises(RuntimeError, match="keys were not captured at reduction layer 1"):
        method.reduce(1, stream)


def test_text_and_image_tokens_merge_with_each_other():
    """[text CLS, t1, t2, pad | image CLS, v1, v2, v3]: t1 and v1 have equal keys, so they merge first.

    ToMe's split by position over the real tokens: A = tCLS, t2, v1, v3 (even), B = t1, vCLS, v2
    (odd); the two CLS take no edge. Output: protected, unmerged A, then B."""
    T, V, C = 4, 4, 6
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(1, T + V, C, generator=g)
    keys[0, 1] = keys[0, 5]  # t1 (position 1, B) ~ v1 (position 4, A)
    mask = torch.tensor([[1, 1, 1, 0, 1, 1, 1, 1]], dtype=torch.bool)
    protected = torch.zeros_like(mask)
    protected[0, [0, T]] = True
    stream = TokenStream(mask, protected, [Segment(TEXT, T, 1), Segment(IMAGE, V, 1)], [(3,), (4,)])
    stream.keys = keys
    method = Tome(TomeConfig(r=1))
    method.reduction_layers(1)
    plan = method.reduce(0, stream)
    assert stream.segments == [Segment(MIXED, 6, 2)] and stream.lengths == [(6,)]
    # [tCLS, vCLS | t2, v3 | t1 (+ v1), v2]: v1 joins t1; the text pad is dropped
    assert plan.dest[0].tolist() == [0, 4, 2, 6, 1, 4, 5, 3]
    assert method.merges_text and not Tome(TomeConfig(r=0)).merges_text


def test_tome_on_vilt_merges_across_modalities_and_proportional_attention_matters():
    backbone = BACKBONES["vilt"]
    model, batch = backbone.build(), backbone.make_batch()
    outs = []
    for proportional in (True, False):
        config = TomeConfig(r=3, proportional_attention=proportional)
        with pumer_plug.apply(model, adapter="vilt", method="tome", config=config) as handle, torch.no_grad():
            outs.append(model(**batch).logits)
            counts = handle.token_counts
            effective = handle.method.effective_r
    assert all(c.text == c.image == 0 and c.mixed > 0 for c in counts.values())
    # padded length 9 + 25 = 34; the longest row has 9 + 25 real tokens, 3 merged per layer
    assert [c.mixed for c in counts.values()] == [31, 28, 25, 22]
    assert effective == {i: [(3, 3, 3)] for i in range(4)}
    assert not torch.allclose(outs[0], outs[1], atol=1e-6)


def test_tome_refuses_a_vilt_head_that_reads_every_text_token():
    model = BACKBONES["vilt"].build("ViltForMaskedLM")
    with pytest.raises(ValueError, match="text tokens cannot be merged"):
        pumer_plug.apply(model, adapter="vilt", method="tome", config=TomeConfig(r=2))
    with pumer_plug.apply(model, adapter="vilt", method="tome", config=TomeConfig(r=0)):
        pass


def test_tome_is_registered_with_its_config():
    assert "tome" in pumer_plug.list_methods()
    method = pumer_plug.make_method("tome")
    assert isinstance(method, Tome) and method.config == TomeConfig()
    assert method.proportional_attention() and method.needs_keys and not method.needs_text_saliency
