"""Speed-ups from interleaved rounds: the median of the paired ratios, and a warning on noisy timing."""
import pytest

from pumer_plug.evaluation.studies.report import format_timing_note, throughput_increase


def test_speed_up_is_the_median_of_the_paired_round_ratios():
    # a first run seen by a new user: a slow moment hit rounds 2, 4 and 5 of both variants
    dense, pumer = [158, 152, 114, 179, 63], [306, 132, 314, 115, 84]
    # per-round ratios 1.94, 0.87, 2.75, 0.64, 1.33 -> median 1.33 (the ratio of medians says 0.87)
    assert throughput_increase(pumer, dense) == pytest.approx(84 / 63)
    assert throughput_increase([2.0, 4.0, 6.0], [1.0, 2.0, 3.0]) == pytest.approx(2.0)


def test_speed_up_needs_paired_rounds():
    assert throughput_increase([], []) is None
    assert throughput_increase([1.0, 2.0], [1.0]) is None


def test_noisy_rounds_print_a_warning_and_steady_ones_do_not():
    steady = [{"throughput_per_s_rounds": [100, 104, 98]}, {"throughput_per_s_rounds": [180, 175, 186]}]
    noisy = steady + [{"throughput_per_s_rounds": [306, 132, 314]}]
    assert format_timing_note(steady) == ""
    assert "timing was noisy" in format_timing_note(noisy) and "2.4x" in format_timing_note(noisy)
