"""The plug-in contract, tested for every registered method x adapter pair.

identity at zero reduction, exact restore after remove(), token counts really shrink,
batched == one-by-one with mixed text lengths, gradients flow, determinism, clear errors.
"""
import pytest
import torch

import pumer_plug
from tests.backbones import BACKBONES, METHOD_CONFIGS

PAIRS = [
    (method, backbone)
    for method in sorted(METHOD_CONFIGS)
    for backbone in sorted(BACKBONES)
    if method in pumer_plug.list_methods() and backbone in pumer_plug.list_adapters()
    and BACKBONES[backbone].tags.get("methods", {method}).__contains__(method)
]


def test_every_registered_method_and_adapter_is_in_the_matrix():
    assert set(pumer_plug.list_methods()) <= set(METHOD_CONFIGS)
    assert set(pumer_plug.list_adapters()) <= set(BACKBONES)


def run(model, backbone, batch):
    with torch.no_grad():
        return backbone.logits(model(**batch))


def snapshot(model):
    return {
        name: (type(m), sorted(vars(m)), dict(m._forward_hooks), dict(m._forward_pre_hooks))
        for name, m in model.named_modules()
    }


def reducing(method, backbone):
    return METHOD_CONFIGS[method][0](backbone.num_layers, backbone.modalities)


@pytest.mark.parametrize("method,name", PAIRS)
def test_identity_when_reduction_is_off(method, name):
    zero = METHOD_CONFIGS[method][1]
    if zero is None:
        pytest.skip(f"{method} has no zero-reduction setting")
    backbone = BACKBONES[name]
    model, batch = backbone.build(), backbone.make_batch()
    ref = run(model, backbone, batch)
    with pumer_plug.apply(model, adapter=name, method=method, config=zero(backbone.num_layers, backbone.modalities)):
        out = run(model, backbone, batch)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,name", PAIRS)
def test_remove_restores_the_model_exactly(method, name):
    backbone = BACKBONES[name]
    model, batch = backbone.build(), backbone.make_batch()
    ref = run(model, backbone, batch)
    before = snapshot(model)
    state = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    handle = pumer_plug.apply(model, adapter=name, method=method, config=reducing(method, backbone))
    reduced = run(model, backbone, batch)
    assert not torch.allclose(reduced, ref, atol=1e-6), "a reducing config left the outputs unchanged"
    handle.remove()
    handle.remove()  # idempotent
    assert snapshot(model) == before
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(state) and all(after[k] is state[k] for k in state)
    torch.testing.assert_close(run(model, backbone, batch), ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method,name", PAIRS)
def test_token_counts_really_shrink(method, name):
    backbone = BACKBONES[name]
    model, batch = backbone.build(), backbone.make_batch()
    with pumer_plug.apply(model, adapter=name, method=method, config=reducing(method, backbone)) as handle:
        run(model, backbone, batch)
        counts = handle.token_counts
    assert counts, "no reduction layer reported token counts"
    totals = [c.total for _, c in sorted(counts.items())]
    assert totals == sorted(totals, reverse=True) and totals[-1] < totals[0] or len(totals) == 1
    baseline = pumer_plug_dense_tokens(model, backbone, batch)
    assert totals[-1] < baseline


def pumer_plug_dense_tokens(model, backbone, batch):
    """Longest token sequence any LayerNorm of the unplugged model sees."""
    seen = []
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1] if a[0].dim() == 3 else 0)) for m in norms]
    run(model, backbone, batch)
    for hook in hooks:
        hook.remove()
    return max(seen)


@pytest.mark.parametrize("method,name", PAIRS)
def test_batched_equals_one_by_one(method, name):
    backbone = BACKBONES[name]
    model, batch = backbone.build(), backbone.make_batch()
    with pumer_plug.apply(model, adapter=name, method=method, config=reducing(method, backbone)):
        batched = run(model, backbone, batch)
        single = torch.cat([run(model, backbone, row) for row in backbone.split(batch)])
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method,name", PAIRS)
def test_gradients_reach_every_parameter(method, name):
    backbone = BACKBONES[name]
    model, batch = backbone.build(), backbone.make_batch()
    model.train()
    backbone.logits(model(**batch)).square().sum().backward()
    dense = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    model.zero_grad(set_to_none=True)
    with pumer_plug.apply(model, adapter=name, method=method, config=reducing(method, backbone)):
        backbone.logits(model(**batch)).square().sum().backward()
    plugged = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert dense and dense <= plugged, sorted(dense - plugged)[:5]


@pytest.mark.parametrize("method,name", PAIRS)
def test_deterministic_across_runs(method, name):
    backbone = BACKBONES[name]
    outs = []
    for _ in range(2):
        model, batch = backbone.build(), backbone.make_batch()
        with pumer_plug.apply(model, adapter=name, method=method, config=reducing(method, backbone)):
            torch.manual_seed(123)
            outs.append(run(model, backbone, batch))
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)


@pytest.mark.parametrize("method,name", PAIRS)
def test_second_apply_raises_and_errors_leave_model_usable(method, name):
    backbone = BACKBONES[name]
    model, batch = backbone.build(), backbone.make_batch()
    ref = run(model, backbone, batch)
    handle = pumer_plug.apply(model, adapter=name, method=method, config=reducing(method, backbone))
    with pytest.raises(RuntimeError, match="already has reducers attached"):
        pumer_plug.apply(model, adapter=name, method=method, config=reducing(method, backbone))
    original = handle.method.reduce

    def broken(*args, **kwargs):
        raise KeyError("boom")

    handle.method.reduce = broken
    with pytest.raises(KeyError, match="boom"):
        run(model, backbone, batch)
    handle.method.reduce = original
    run(model, backbone, batch)  # still usable while plugged
    handle.remove()
    torch.testing.assert_close(run(model, backbone, batch), ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method,name", PAIRS)
def test_reduction_layer_beyond_depth_is_refused(method, name):
    backbone = BACKBONES[name]
    model = backbone.build()
    config = reducing(method, backbone)
    if not hasattr(config, "reduction_layers"):
        pytest.skip(f"{method} does not take reduction layers")
    import dataclasses

    too_deep = dataclasses.replace(config, reduction_layers=(backbone.num_layers,))
    with pytest.raises(ValueError, match="beyond"):
        pumer_plug.apply(model, adapter=name, method=method, config=too_deep)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
