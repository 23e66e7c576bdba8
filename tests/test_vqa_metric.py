"""VQA accuracy against hand-computed cases and an independent loop implementation of vqaEval.py."""
from __future__ import annotations

import random
import re
from fractions import Fraction

import pytest

from pumer_plug.evaluation.tasks.data_files import DataError
from pumer_plug.evaluation.tasks.vqa_metric import (
    _PERIOD,
    normalize_answer,
    process_digit_article,
    process_punctuation,
    question_accuracy,
    soft_score_accuracy,
    vqa_accuracy,
)
from pumer_plug.evaluation.tasks.vqav2 import VqaExample


def _gts(n_match: int, match: str = "cat", other: str = "dog") -> list[str]:
    return [match] * n_match + [other] * (10 - n_match)


# ---- leave-one-annotator-out: n of 10 annotators gave the predicted answer ----
# score = mean over the 10 subsets of 9 annotators of min(1, matches/3):
#   n=0: every subset has 0 matches                             -> 0
#   n=1: 1 subset (leaving out the match) 0, 9 subsets 1/3      -> (9 * 1/3) / 10          = 0.3
#   n=2: 2 subsets 1/3, 8 subsets 2/3                           -> (2/3 + 16/3) / 10       = 0.6
#   n=3: 3 subsets 2/3, 7 subsets 3/3                           -> (2 + 7) / 10            = 0.9
#   n=4: 4 subsets min(1, 3/3) = 1, 6 subsets min(1, 4/3) = 1   -> 1.0
@pytest.mark.parametrize("n_match, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_leave_one_annotator_out(n_match, expected):
    assert question_accuracy("cat", _gts(n_match)) == pytest.approx(expected, abs=1e-12)


def test_number_words_map_to_digits():
    # annotators disagree, so both sides are normalized: "Two" -> "2"; 3 of 10 said "2" -> 0.9
    assert question_accuracy("Two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    # the ground truth is normalized too: "two" -> "2"
    assert question_accuracy("2", ["two"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert normalize_answer("Ten") == "10" and normalize_answer("none") == "0"


def test_unanimous_annotators_are_compared_without_normalization():
    # official vqaEval.py normalizes only when len(set(answers)) > 1: against ten identical
    # answers the prediction must match the raw string (after whitespace stripping)
    assert question_accuracy("Two", ["2"] * 10) == 0.0
    assert question_accuracy("yes.", ["yes"] * 10) == 0.0
    assert question_accuracy("  yes\n", ["yes"] * 10) == 1.0  # whitespace is always stripped
    assert question_accuracy("yes", ["yes"] * 10) == 1.0


def test_trailing_period_and_yes():
    # "yes." -> period not before a digit is dropped -> "yes"; 9 of 10 match -> every subset >= 3 -> 1.0
    assert question_accuracy("yes.", ["yes"] * 9 + ["no"]) == 1.0
    # "No." -> "no", which 1 of 10 annotators gave -> 0.3 as n=1 above
    assert question_accuracy("No.", ["yes"] * 9 + ["no"]) == pytest.approx(0.3)


def test_article_period_and_number_word_in_a_phrase():
    # "the red one." -> "the red one" (period) -> drop "the", "one" -> "1" -> "red 1"
    assert normalize_answer("the red one.") == "red 1"
    # 2 annotators said "red one" (-> "red 1"), 8 said "red": n=2 -> 0.6
    assert question_accuracy("the red one.", ["red one"] * 2 + ["red"] * 8) == pytest.approx(0.6)
    assert question_accuracy("the red one.", ["red"] * 8 + ["blue"] * 2) == 0.0


def test_contractions_dont():
    # "dont" -> "don't" (contraction table); "don't" has no punctuation to strip (no ' in the list)
    assert normalize_answer("dont") == "don't" == normalize_answer("don't")
    assert question_accuracy("don't", ["dont"] * 4 + ["no"] * 6) == 1.0
    assert question_accuracy("dont", ["don't"] * 1 + ["no"] * 9) == pytest.approx(0.3)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1,000", "1000"),  # a digit,digit comma: every mark is removed, not spaced
        ("red,blue", "red blue"),  # a comma not touching a space becomes a space
        ("red, blue", "red blue"),  # a comma touching a space is removed (the space stays)
        ("2.5", "2.5"),  # a period before a digit stays
        ("yes!", "yes "),
        ("hot-dog", "hot dog"),
        ("a.b.c", "abc"),
        ("what?!", "what  "),
    ],
)
def test_process_punctuation(text, expected):
    assert process_punctuation(text) == expected


def test_process_digit_article():
    assert process_digit_article("An Apple  and THE two") == "apple and 2"
    assert process_digit_article("Im") == "im"  # capitalized table keys never match after lower-casing


def test_vqa_accuracy_overall_and_per_type():
    qs = [
        VqaExample(1, "q", None, 0, tuple(["yes"] * 10), "yes/no", "is"),  # "yes" -> 1.0
        VqaExample(2, "q", None, 0, tuple(["2"] * 2 + ["3"] * 8), "number", "how many"),  # "two" n=2 -> 0.6
        VqaExample(3, "q", None, 0, tuple(["cat"] * 1 + ["dog"] * 9), "other", "what"),  # "cat" n=1 -> 0.3
        VqaExample(4, "q", None, 0, tuple(["red"] * 10), "other", "what"),  # "blue" -> 0
    ]
    score = vqa_accuracy({1: "yes", 2: "two", 3: "cat", 4: "blue"}, qs)
    assert score.overall == pytest.approx((1.0 + 0.6 + 0.3 + 0.0) / 4)
    assert score.per_answer_type == pytest.approx({"yes/no": 1.0, "number": 0.6, "other": 0.15})
    assert score.per_question_type["what"] == pytest.approx(0.15)
    assert score.num_questions == 4
    assert score.as_percent()["overall"] == 47.5


def test_vqa_accuracy_refuses_missing_and_extra_predictions():
    qs = [VqaExample(7, "q", None, 0, ("a",) * 10), VqaExample(8, "q", None, 0, ("b",) * 10)]
    with pytest.raises(DataError, match="no prediction for question 8"):
        vqa_accuracy({7: "a"}, qs)
    with pytest.raises(DataError, match="question 9"):
        vqa_accuracy({7: "a", 8: "b", 9: "c"}, qs)
    with pytest.raises(DataError, match="no annotated answers"):
        vqa_accuracy({1: "a"}, [VqaExample(1, "q", None, 0)])


def test_soft_score_accuracy_reads_stored_scores():
    qs = [VqaExample(1, "q", b"", 0, answer_scores=(("2", 1.0), ("3", 0.9))),
          VqaExample(2, "q", b"", 0, answer_scores=(("red", 0.6),))]
    score = soft_score_accuracy({1: "3", 2: "blue"}, qs)
    assert score.overall == pytest.approx((0.9 + 0.0) / 2)


# ---- an independent implementation, written from the official algorithm as plain loops ----
_REF_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_REF_NUMBERS = dict(zip("none zero one two three four five six seven eight nine ten".split(),
                        "0 0 1 2 3 4 5 6 7 8 9 10".split()))
_REF_CONTRACTIONS = {"dont": "don't", "cant": "can't", "whats": "what's", "isnt": "isn't", "youre": "you're"}


def _ref_punctuation(text: str) -> str:
    has_digit_comma = any(text[i - 1].isdigit() and text[i] == "," and text[i + 1].isdigit() for i in range(1, len(text) - 1))
    out = text
    for p in _REF_PUNCT:
        replacement = "" if (has_digit_comma or p + " " in text or " " + p in text) else " "
        out = "".join(replacement if ch == p else ch for ch in out)
    kept, removed = [], 0
    for i, ch in enumerate(out):
        next_is_digit = i + 1 < len(out) and out[i + 1] in "0123456789"
        if ch == "." and not next_is_digit and removed < 32:
            removed += 1
            continue
        kept.append(ch)
    return "".join(kept)


def _ref_digit_article(text: str) -> str:
    words = []
    for w in text.lower().split():
        w = _REF_NUMBERS.get(w, w)
        if w in ("a", "an", "the"):
            continue
        words.append(_REF_CONTRACTIONS.get(w, w))
    return " ".join(words)


def _ref_accuracy(prediction: str, answers: list[str]) -> Fraction:
    def clean(s):
        return s.replace("\n", " ").replace("\t", " ").strip()

    gts = [clean(a) for a in answers]
    pred = clean(prediction)
    if len(set(gts)) > 1:
        gts = [_ref_digit_article(_ref_punctuation(a)) for a in gts]
        pred = _ref_digit_article(_ref_punctuation(pred))
    total = Fraction(0)
    for left_out in range(len(gts)):
        others = gts[:left_out] + gts[left_out + 1:]
        matches = 0
        for a in others:
            if a == pred:
                matches += 1
        total += min(Fraction(1), Fraction(matches, 3))
    return total / len(gts)


_VOCAB = ["2", "two", "Two", "two.", "3", "three", "yes", "yes.", "Yes", "no", "no!", "cat", "a cat", "the cat",
          "Cat.", "dont", "don't", "cant", "red,blue", "red, blue", "1,000", "1000", "2.5", "hot-dog", "hot dog",
          " cat ", "cat\n", "(cat)", "what's", "whats", "none", "0", "an apple", "apple", "isnt", "isn't"]


def test_matches_independent_implementation_on_random_cases():
    rng = random.Random(0)
    for _ in range(3000):
        pool = rng.sample(_VOCAB, rng.randint(1, 4))
        answers = [rng.choice(pool) for _ in range(10)]
        prediction = rng.choice(pool + [rng.choice(_VOCAB)])
        assert question_accuracy(prediction, answers) == pytest.approx(float(_ref_accuracy(prediction, answers)), abs=1e-12), (prediction, answers)


def test_period_pattern_equals_the_official_regex():
    official = re.compile(r"(?!<=\d)(\.)(?!\d)")  # as written in vqaEval.py
    rng = random.Random(1)
    for _ in range(2000):
        text = "".join(rng.choice("ab1 2.<=,") for _ in range(rng.randint(0, 12)))
        assert _PERIOD.sub("", text) == official.sub("", text), text
