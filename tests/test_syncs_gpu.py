"""On a GPU: the reduced forward makes no host-device sync inside the library's hooks, except the one
documented read of the real lengths at the start of a forward (``adapters.base.real_lengths``)."""
from __future__ import annotations

import importlib

import pytest
import torch

import pumer_plug
from pumer_plug.handle import ReductionHandle
from tests.backbones import BACKBONES, METHOD_CONFIGS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _sync_mode(mode: str):
    def wrap(fn):
        def run(*args, **kwargs):
            before = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode(mode)
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(before)

        return run

    return wrap


@pytest.fixture
def strict_hooks(monkeypatch):
    """Every hook the library registers runs under sync debug mode "error"; ``real_lengths`` (the
    forward's one read) runs under "default" and is counted."""
    reads = []
    timed = ReductionHandle.timed
    monkeypatch.setattr(ReductionHandle, "timed", lambda self, fn: timed(self, _sync_mode("error")(fn)))
    for name in ("vilt", "meter", "bridgetower"):
        module = importlib.import_module(f"pumer_plug.adapters.{name}")
        if hasattr(module, "real_lengths"):
            inner = module.real_lengths

            def counted(*args, inner=inner, **kwargs):
                reads.append(1)
                return _sync_mode("default")(inner)(*args, **kwargs)

            monkeypatch.setattr(module, "real_lengths", counted)
    return reads


@pytest.mark.parametrize("method", ["pumer", "tome", "dynamicvit"])
@pytest.mark.parametrize("name", ["vilt", "meter", "bridgetower", "timm-vit"])
def test_reduced_forward_makes_at_most_one_sync(name, method, strict_hooks):
    backbone = BACKBONES[name]
    if method == "pumer" and name == "timm-vit":
        pytest.skip("PuMer needs text")
    model = backbone.build().cuda()
    batch = {k: v.cuda() for k, v in backbone.make_batch().items()}
    config = METHOD_CONFIGS[method][0](backbone.num_layers, backbone.modalities)
    with pumer_plug.apply(model, method=method, config=config), torch.no_grad():
        model(**batch)  # warm-up
        strict_hooks.clear()
        model(**batch)
    assert len(strict_hooks) <= 1
