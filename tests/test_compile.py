"""torch.compile of a plugged model (CPU backend "eager"): same token counts and outputs as eager,
or an error naming compile when dynamo skips the hooks of a reduction layer."""
from __future__ import annotations

import pytest
import torch

import pumer_plug
from tests.backbones import BACKBONES, METHOD_CONFIGS


@pytest.fixture
def hook_guards():
    import torch._dynamo

    before = torch._dynamo.config.skip_nnmodule_hook_guards
    torch._dynamo.reset()
    yield
    torch._dynamo.config.skip_nnmodule_hook_guards = before
    torch._dynamo.reset()


def _plugged(name: str):
    backbone = BACKBONES[name]
    model = backbone.build()
    config = METHOD_CONFIGS["pumer"][0](backbone.num_layers, backbone.modalities)
    return backbone, model, pumer_plug.apply(model, method="pumer", config=config)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vilt", "meter"])
def test_compiled_plugged_model_equals_eager(name, hook_guards):
    backbone, model, handle = _plugged(name)
    batch = backbone.make_batch()
    with handle, torch.no_grad():
        want = backbone.logits(model(**batch))
        want_counts = {k: vars(v) for k, v in handle.token_counts.items()}
        compiled = pumer_plug.compile(model, backend="eager")
        got = backbone.logits(compiled(**batch))
        assert {k: vars(v) for k, v in handle.token_counts.items()} == want_counts
    assert len(want_counts) >= 2
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_compile_without_hook_guards_raises_naming_compile(hook_guards):
    import torch._dynamo

    torch._dynamo.config.skip_nnmodule_hook_guards = True  # torch's default
    backbone, model, handle = _plugged("vilt")
    with handle, torch.no_grad(), pytest.raises(RuntimeError, match="torch.compile"):
        torch.compile(model, backend="eager")(**backbone.make_batch())
