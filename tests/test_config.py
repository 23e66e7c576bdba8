import math

import pytest

from pumer_plug import PumerConfig


@pytest.mark.parametrize("field", ["prune_ratio", "image_merge_ratio", "text_merge_ratio"])
@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, math.nan, "0.1", True])
def test_bad_ratios_name_the_field_and_range(field, value):
    with pytest.raises(ValueError, match=rf"PumerConfig\.{field} must be .*\[0, 1\)"):
        PumerConfig(**{field: value})


@pytest.mark.parametrize("layers", [(3, 1), (1, 1), (-1,), (1.5,), "12", 3])
def test_bad_reduction_layers(layers):
    with pytest.raises(ValueError, match="PumerConfig.reduction_layers"):
        PumerConfig(reduction_layers=layers)


def test_proportional_attention_must_be_bool():
    with pytest.raises(ValueError, match="proportional_attention"):
        PumerConfig(proportional_attention="yes")


def test_presets_name_their_source_and_validate():
    assert "vilt-vqa" in PumerConfig.list_presets() and "meter-vqa" in PumerConfig.list_presets()
    for name in PumerConfig.list_presets():
        config = PumerConfig.preset(name)
        assert PumerConfig.PRESET_SOURCES[name]
        assert config.reduction_layers
    assert PumerConfig.preset("vilt-ve") == PumerConfig((2, 4, 6, 8), 0.1, 0.3, 0.2)
    assert PumerConfig.preset("vilt-vqa", prune_ratio=0.2).prune_ratio == 0.2
    with pytest.raises(ValueError, match="unknown PuMer preset 'x'"):
        PumerConfig.preset("x")


def test_from_dict_rejects_unknown_fields():
    assert PumerConfig.from_dict({"reduction_layers": [1, 2]}).reduction_layers == (1, 2)
    with pytest.raises(ValueError, match="unknown PumerConfig field"):
        PumerConfig.from_dict({"prune": 0.1})


def test_schedule_shrinks_only_at_reduction_layers():
    counts = PumerConfig((1, 3), 0.1, 0.3, 0.2).token_schedule(40, 241, 5)
    assert counts[0] == (40, 241)
    assert counts[1][0] < 40 and counts[1][1] < 241
    assert counts[2] == counts[1]
    assert counts[3][1] < counts[2][1]
    assert PumerConfig((0,), 0, 0, 0).token_schedule(40, 241, 2) == [(40, 241), (40, 241)]


def test_saliency_heads_is_validated_and_described():
    with pytest.raises(ValueError, match="saliency_heads"):
        PumerConfig(saliency_heads="mean")
    assert PumerConfig.preset("vilt-vqa").saliency_heads == "first"  # released ViLT VQA default
    assert "heads=first" in PumerConfig.preset("vilt-vqa").describe()
    assert "heads" not in PumerConfig.preset("vilt-ve").describe()
