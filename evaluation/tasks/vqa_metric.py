"""VQA accuracy exactly as the official VQA evaluation computes it.

Source: GT-Vision-Lab/VQA ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` at its last commit
(a013f00, "Fixed processing answers bug", 2021), reimplemented here. Per question:

1. Newlines and tabs become spaces; the prediction and every ground-truth answer are stripped.
2. Only if the annotators disagree (more than one distinct stripped answer) are the ground-truth
   answers *and* the prediction normalized: punctuation (:func:`process_punctuation`), then lower
   case, number words to digits, articles dropped, contractions restored
   (:func:`process_digit_article`). When all annotators gave the same string the prediction is
   compared as given (stripped only): ``"yes."`` scores 0 against ten ``"yes"``. That is the
   official behaviour and is kept so that numbers match the leaderboard.
3. The score is the mean over the leave-one-annotator-out subsets (10 for VQAv2) of
   ``min(1, matches / 3)``, where ``matches`` counts the other annotators whose answer equals the
   prediction. With ``n`` matching annotators out of 10 this is 0.3, 0.6, 0.9, 1.0 for n = 1..4.

Overall and per answer type (``yes/no``, ``number``, ``other``) accuracy is the mean of the
per-question scores. We report fractions in [0, 1]; the official script prints
``round(100 * mean, 2)``.
"""
from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .data_files import DataError

#: characters the official code removes (next to a space, or in a text with a digit,digit comma)
#: or replaces by a space (elsewhere)
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
#: number words the official code maps to digits (``none`` counts as 0)
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
#: words written without their apostrophe, restored (the official table, including its oddities:
#: keys with capitals never match after lower-casing, and ``somebody'd`` maps to ``somebodyd``)
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's",
    "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
#: a period not followed by a digit (the official pattern ``(?!<=\d)(\.)(?!\d)`` starts with a
#: lookahead typo that always succeeds, so it is this); "2.5" keeps its period, "1." loses it
_PERIOD = re.compile(r"\.(?!\d)")
#: a comma between digits ("1,000"); if a text has one, every punctuation mark is removed, not spaced
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
#: the official code passes ``re.UNICODE`` (32) where ``re.sub`` takes ``count``: at most 32 periods go
_MAX_PERIODS_REMOVED = 32


def clean_whitespace(answer: str) -> str:
    """Newlines and tabs to spaces, then strip (applied to every answer before anything else)."""
    return answer.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """The official ``processPunctuation``: punctuation removed or spaced, periods not before a digit dropped.

    A mark is removed when it touches a space anywhere in the text, or when the text has a comma
    between digits; otherwise it becomes a space. Both tests look at the input text, not the text
    being edited. Then periods not followed by a digit are removed.

    Example:
        >>> process_punctuation("the red one.")
        'the red one'
        >>> process_punctuation("1,000")
        '1000'
    """
    digit_comma = _DIGIT_COMMA.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        touches_space = (mark + " ") in text or (" " + mark) in text
        out = out.replace(mark, "" if touches_space or digit_comma else " ")
    return _PERIOD.sub("", out, count=_MAX_PERIODS_REMOVED)


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lower case, number words to digits, no articles, contractions.

    Example:
        >>> process_digit_article("Two Dogs")
        '2 dogs'
        >>> process_digit_article("the dont")
        "don't"
    """
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(answer: str) -> str:
    """The full official normalization of one answer (whitespace, punctuation, digits/articles/contractions).

    Note the official score applies it only to questions whose annotators disagree; see
    :func:`question_accuracy`.
    """
    return process_digit_article(process_punctuation(clean_whitespace(answer)))


def question_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The official VQA accuracy of one predicted answer against the annotators' answers.

    Args:
        prediction: the model's answer string.
        answers: every annotator's raw answer (10 for VQAv2), duplicates included.

    Returns:
        The mean over the leave-one-annotator-out subsets of ``min(1, matches / 3)``, in [0, 1].

    Raises:
        DataError: ``answers`` is empty.

    Example:
        >>> question_accuracy("Two", ["2", "2", "two", "3", "2", "2", "2", "2", "2", "2"])
        1.0
    """
    if not answers:
        raise DataError("a question has no ground-truth answers; VQA accuracy needs the annotators' answers")
    gts = [clean_whitespace(answer) for answer in answers]
    pred = clean_whitespace(prediction)
    if len(set(gts)) > 1:  # official: normalize only when the annotators disagree
        gts = [process_digit_article(process_punctuation(answer)) for answer in gts]
        pred = process_digit_article(process_punctuation(pred))
    matching = sum(answer == pred for answer in gts)
    # subset without annotator i: its matches are all matches, minus annotator i if it matched
    subset_scores = [min(1.0, float(matching - (answer == pred)) / 3) for answer in gts]
    return float(sum(subset_scores)) / len(subset_scores)


class VqaGroundTruth(Protocol):
    """What the metric reads from a question (a :class:`~.vqav2.VqaExample` has it)."""

    question_id: int | str
    answers: Sequence[str]
    answer_type: str | None
    question_type: str | None


@dataclass(frozen=True)
class VqaScore:
    """VQA accuracy of one set of predictions.

    Attributes:
        overall: mean per-question accuracy, a fraction in [0, 1].
        per_answer_type: the same mean per answer type (``yes/no``, ``number``, ``other``).
        per_question_type: the same mean per question type (``what color``, ...).
        per_question: each question's accuracy by question id.
        num_questions: how many questions were scored.
    """

    overall: float
    per_answer_type: dict[str, float]
    per_question_type: dict[str, float]
    per_question: dict[int | str, float] = field(repr=False)
    num_questions: int

    def as_percent(self) -> dict[str, float | dict[str, float]]:
        """The official script's numbers: ``round(100 * accuracy, 2)`` overall and per type."""
        pct = lambda x: round(100 * x, 2)  # noqa: E731
        return {
            "overall": pct(self.overall),
            "perAnswerType": {k: pct(v) for k, v in self.per_answer_type.items()},
            "perQuestionType": {k: pct(v) for k, v in self.per_question_type.items()},
        }


def _mean(values: list[float]) -> float:
    return float(sum(values)) / len(values)


def _score_questions(predictions: Mapping, questions: Iterable, score_one: Callable[[Any, str], float]) -> VqaScore:
    """Scores every question with ``score_one(question, prediction)`` and averages overall and per type."""
    per_question: dict = {}
    by_answer_type: dict[str, list[float]] = defaultdict(list)
    by_question_type: dict[str, list[float]] = defaultdict(list)
    for q in questions:
        if q.question_id not in predictions:
            raise DataError(f"no prediction for question {q.question_id}; the results must answer every question scored")
        if q.question_id in per_question:
            raise DataError(f"question {q.question_id} is given twice")
        score = score_one(q, predictions[q.question_id])
        per_question[q.question_id] = score
        by_answer_type[q.answer_type or "unknown"].append(score)
        by_question_type[q.question_type or "unknown"].append(score)
    extra = next((qid for qid in predictions if qid not in per_question), None)
    if extra is not None:
        raise DataError(f"prediction for question {extra}, which is not among the {len(per_question)} questions scored")
    if not per_question:
        raise DataError("no questions to score")
    return VqaScore(
        overall=_mean(list(per_question.values())),
        per_answer_type={k: _mean(v) for k, v in sorted(by_answer_type.items())},
        per_question_type={k: _mean(v) for k, v in sorted(by_question_type.items())},
        per_question=per_question,
        num_questions=len(per_question),
    )


def vqa_accuracy(predictions: Mapping[int | str, str], questions: Iterable[VqaGroundTruth]) -> VqaScore:
    """Scores predicted answers on the given questions as the official evaluation does.

    Args:
        predictions: question id -> predicted answer, one for every question (and no others).
        questions: the questions with their annotators' answers and types, e.g. a VQAv2 split or
            its seeded subset.

    Returns:
        The overall, per-answer-type and per-question-type accuracy.

    Raises:
        DataError: a question has no prediction or no answers, is given twice, or a prediction is
            for a question not given, naming the first offending question id (the official script
            refuses results that do not cover exactly its questions, too).
    """

    def score_one(q: VqaGroundTruth, prediction: str) -> float:
        if not q.answers:
            raise DataError(f"question {q.question_id} has no annotated answers (a test split?): write a submission instead")
        return question_accuracy(prediction, q.answers)

    return _score_questions(predictions, questions, score_one)


class VqaSoftTargets(Protocol):
    """What :func:`soft_score_accuracy` reads from a question (ViLT arrow records have it)."""

    question_id: int | str
    answer_scores: Sequence[tuple[str, float]]
    answer_type: str | None
    question_type: str | None


def soft_score_accuracy(predictions: Mapping[int | str, str], questions: Iterable[VqaSoftTargets]) -> VqaScore:
    """ViLT's VQA score: each question scores the stored soft score of the predicted answer (0 if absent).

    For sources that keep only soft targets (ViLT's arrow tables). The soft score of an answer given
    by n annotators (0.3, 0.6, 0.9, 1.0) equals its official accuracy without normalization; answers
    outside ViLT's label space were dropped when the table was written, so this can differ from
    :func:`vqa_accuracy` on the JSON files.

    Raises:
        DataError: as :func:`vqa_accuracy`, with "no soft scores" in place of "no answers".
    """

    def score_one(q: VqaSoftTargets, prediction: str) -> float:
        if not q.answer_scores:
            raise DataError(f"question {q.question_id} has no answer scores (a test split?): write a submission instead")
        return float(dict(q.answer_scores).get(prediction, 0.0))

    return _score_questions(predictions, questions, score_one)
