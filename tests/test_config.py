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


# -- one base for every method's config ------------------------------------------------------------
import json  # noqa: E402

import pumer_plug  # noqa: E402
from pumer_plug import DynamicViTConfig, MethodConfig, SmResConfig, TomeConfig  # noqa: E402

ALL_CONFIGS = [PumerConfig, TomeConfig, DynamicViTConfig, SmResConfig]


def test_every_methods_config_is_a_method_config_exported_from_the_package():
    for name in pumer_plug.list_methods():
        cls = pumer_plug.METHODS.get(name).config_class
        assert issubclass(cls, MethodConfig) and getattr(pumer_plug, cls.__name__) is cls
        assert cls.list_presets() == sorted(cls.PRESETS) and set(cls.PRESET_SOURCES) == set(cls.PRESETS)


@pytest.mark.parametrize("config,text", [
    (TomeConfig(r=12), "ToMe r=12"),
    (PumerConfig((2, 5, 8), 0.1, 0.3, 0.2), "PuMer layers=2,5,8 k=0.1 r=0.3 t=0.2"),
    (DynamicViTConfig(reduction_layers=(3, 6, 9), keep_ratio=0.7), "DynamicViT layers=3,6,9 rho=0.7"),
    (SmResConfig(scale=0.75), "SmRes scale=0.75"),
    (SmResConfig(image_size=(288, 480)), "SmRes image_size=288x480"),
])
def test_describe_is_short_and_human(config, text):
    assert config.describe() == text


@pytest.mark.parametrize("cls", ALL_CONFIGS)
def test_to_dict_and_from_dict_round_trip_through_json(cls):
    config = cls()
    assert cls.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize("cls,field,value", [
    (PumerConfig, "prune_ratio", 1.5), (TomeConfig, "r", -2), (DynamicViTConfig, "keep_ratio", 0.0),
    (DynamicViTConfig, "keep_ratio_weight", -1.0), (SmResConfig, "scale", 2.0), (TomeConfig, "proportional_attention", 1),
])
def test_from_dict_names_the_field_out_of_range(cls, field, value):
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.{field}"):
        cls.from_dict({field: value})


def test_presets_of_every_config_go_through_the_base():
    assert DynamicViTConfig.preset("vilt").describe() == "DynamicViT layers=3,6,9 rho=0.7"
    with pytest.raises(ValueError, match="unknown ToMe preset 'x'; known presets: \\(none\\)"):
        TomeConfig.preset("x")


def test_inline_json_config_on_the_command_line():
    from pumer_plug.config import load_method_config
    from pumer_plug.errors import UserError

    assert load_method_config("tome", '{"r": 12}').r == 12
    with pytest.raises(UserError, match="inline tome config .* not valid JSON"):
        load_method_config("tome", '{"r": 12')
    with pytest.raises(UserError, match="r"):
        load_method_config("tome", '{"r": -3}')
