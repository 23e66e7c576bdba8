"""Every PuMer preset's token schedule equals the released PuMer code's (csarron/PuMer).

The table was worked out by hand from the released code's counting rule: at a reduction layer
``round(k * V)`` image tokens are pruned and ``round(r * V)`` merged (``V`` before pruning), the
merge capped at ``(V_kept - 1) // 2``; ``round(t * T)`` text tokens merged; Python's ``round()``
rounds half to even. E.g. vilt-vqa at 145 image tokens, layer 2: round(14.5) = 14 pruned -> 131,
round(43.5) = 44 merged -> 87; layer 5: round(8.7) = 9 -> 78, round(26.1) = 26 -> 52; layer 8:
round(5.2) = 5 -> 47, round(15.6) = 16 -> 31. Input sizes: ViLT-B/32 at 384 px (144 patches +
image CLS), METER CLIP-ViT-B/16 at 384 px (576 + 1; NLVR2 at 288 px: 324 + 1), 40 text tokens;
the built-in model: 16 text tokens, 144 patches + image CLS.
"""
import pytest

from pumer_plug.config import PumerConfig

# preset: (text tokens, image tokens, depth), [(text, image) after each reduction layer]
RELEASED_SCHEDULES = {
    "vilt-vqa": ((40, 145, 12), [(32, 87), (26, 52), (21, 31)]),
    "vilt-nlvr2": ((40, 145, 12), [(32, 87), (26, 52), (21, 31)]),
    "vilt-ve": ((40, 145, 12), [(32, 87), (26, 52), (21, 31), (17, 19)]),
    "meter-vqa": ((40, 577, 6), [(32, 347), (26, 209), (21, 125), (17, 75)]),
    "meter-nlvr2": ((40, 325, 6), [(32, 114), (26, 41), (21, 15)]),
    "meter-ve": ((40, 577, 6), [(32, 203), (26, 72), (21, 26), (17, 10)]),
    "meter-retrieval": ((40, 577, 6), [(32, 232), (26, 94), (21, 38)]),
    "builtin-digits": ((16, 145, 6), [(15, 80), (14, 44), (13, 24)]),
}


def test_every_encoder_preset_has_a_released_schedule():
    encoder_presets = [n for n in PumerConfig.list_presets() if not n.startswith("llava-")]
    assert sorted(RELEASED_SCHEDULES) == encoder_presets


@pytest.mark.parametrize("keep", [192, 128, 64])
def test_llava_presets_keep_their_budget_of_576_image_tokens(keep):
    config = PumerConfig.preset(f"llava-keep{keep}")
    schedule = config.token_schedule(20, 576, 32)
    assert schedule[0] == (20, 576) and schedule[1] == (20, keep) and schedule[-1] == (20, keep)


@pytest.mark.parametrize("name", sorted(RELEASED_SCHEDULES))
def test_preset_schedule_equals_released_code(name):
    (T, V, depth), expected = RELEASED_SCHEDULES[name]
    config = PumerConfig.preset(name)
    schedule = config.token_schedule(T, V, depth)
    assert [schedule[i] for i in config.reduction_layers] == expected
