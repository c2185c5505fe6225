"""The answer normalisation and per-question scoring rules of the three VQA accuracy scripts.

All three score a question the same way once the answers are normalised: for each of the N human
answers `gt`, the "other" answers are those whose *whole answer dict* differs from `gt`
(`item != gtAnsDatum`), and `acc(gt) = min(1, #others equal to the prediction / 3)`; the question's
accuracy is the mean over the N. With an `answer_id` in every dict exactly one dict is left out;
without one (OpenFlamingo's VizWiz files) *every* identical answer is left out. The scripts differ
in what they normalise, and when:

| mode | prediction | human answers |
|---|---|---|
| `official_2017` (GT-Vision-Lab/VQA a4f1afd, 2017-10-02, the VQA v2.0 release) | `\\n`/`\\t` -> space, strip, punctuation, then digits/articles/contractions: always | as given (no strip); punctuation only (no lower-casing, digits or articles), and only if the N answers are not all identical |
| `official` (GT-Vision-Lab/VQA a013f00, 2021-03-11, "Fixed processing answers bug", master) | `\\n`/`\\t` -> space, strip always; punctuation + digits/articles only if the answers are not all identical | `\\n`/`\\t` -> space, strip always; punctuation + digits/articles only if they are not all identical |
| `openflamingo` (open_flamingo 2.0.1 `eval/vqa_metric.py`) | `\\n`/`\\t` -> space, strip, punctuation, digits/articles: always | the same as the prediction: always |

So under `official`, "Yes" against ten "yes" scores 0 (no normalisation when the humans agree),
while the other two modes give 1. The identical-answer test looks at the answers after the
strip (`official`) or as given (`official_2017`).

Punctuation (`processPunctuation`, identical in all three): for each of `; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`,
the character is deleted if the *original* text has it next to a space or contains a digit-comma-digit
group anywhere, else replaced by a space; then every period not followed by a digit is deleted,
at most 32 of them (the scripts pass `re.UNICODE` as the `count` argument of `re.sub`). Their
intended look-behind for a preceding digit is misspelt `(?!<=\\d)`, a look-ahead for the literal
"<=" + digit, so it never protects anything: "1.5" keeps its period only thanks to `(?!\\d)`.
Digits/articles (`processDigitArticle`): lower-case, split on whitespace, number words none..ten -> 0..10, drop
a/an/the, then the contractions table ("dont" -> "don't"), joined by single spaces.
"""

from __future__ import annotations

import re

MODES = ("official", "official_2017", "openflamingo")

_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
          ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the scripts' pattern, misspelt look-behind included
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PERIOD_COUNT = int(re.UNICODE)  # the scripts pass re.UNICODE (32) as sub()'s count
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}

# The scripts' contractions table (120 entries, the same in all three), as "key value" pairs.
_CONTRACTIONS_TEXT = """
aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've
couldnt've couldn't've|didnt didn't|doesnt doesn't|dont don't|hadnt hadn't|hadnt've hadn't've
hadn'tve hadn't've|hasnt hasn't|havent haven't|hed he'd|hed've he'd've|he'dve he'd've|hes he's
howd how'd|howll how'll|hows how's|Id've I'd've|I'dve I'd've|Im I'm|Ive I've|isnt isn't|itd it'd
itd've it'd've|it'dve it'd've|itll it'll|let's let's|maam ma'am|mightnt mightn't
mightnt've mightn't've|mightn'tve mightn't've|mightve might've|mustnt mustn't|mustve must've
neednt needn't|notve not've|oclock o'clock|oughtnt oughtn't|ow's'at 'ow's'at|'ows'at 'ow's'at
'ow'sat 'ow's'at|shant shan't|shed've she'd've|she'dve she'd've|she's she's|shouldve should've
shouldnt shouldn't|shouldnt've shouldn't've|shouldn'tve shouldn't've|somebody'd somebodyd
somebodyd've somebody'd've|somebody'dve somebody'd've|somebodyll somebody'll|somebodys somebody's
someoned someone'd|someoned've someone'd've|someone'dve someone'd've|someonell someone'll
someones someone's|somethingd something'd|somethingd've something'd've
something'dve something'd've|somethingll something'll|thats that's|thered there'd
thered've there'd've|there'dve there'd've|therere there're|theres there's|theyd they'd
theyd've they'd've|they'dve they'd've|theyll they'll|theyre they're|theyve they've|twas 'twas
wasnt wasn't|wed've we'd've|we'dve we'd've|weve we've|werent weren't|whatll what'll|whatre what're
whats what's|whatve what've|whens when's|whered where'd|wheres where's|whereve where've|whod who'd
whod've who'd've|who'dve who'd've|wholl who'll|whos who's|whove who've|whyll why'll|whyre why're
whys why's|wont won't|wouldve would've|wouldnt wouldn't|wouldnt've wouldn't've
wouldn'tve wouldn't've|yall y'all|yall'll y'all'll|y'allll y'all'll|yall'd've y'all'd've
y'alld've y'all'd've|y'all'dve y'all'd've|youd you'd|youd've you'd've|you'dve you'd've
youll you'll|youre you're|youve you've
"""
CONTRACTIONS = dict(pair.split(" ") for pair in _CONTRACTIONS_TEXT.replace("\n", "|").split("|") if pair)


def clean_whitespace(text: str) -> str:
    """Tabs and newlines -> spaces, then strip (every script's first step for the prediction)."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """The scripts' `processPunctuation` (see the module docstring)."""
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """The scripts' `processDigitArticle`: lower, number words, articles, contractions."""
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize(text: str) -> str:
    """Punctuation then digits/articles: what every mode applies when it normalises fully."""
    return process_digit_article(process_punctuation(text))


def _normalized_answers(prediction: str, answers: list[dict], mode: str) -> tuple[str, list[dict]]:
    """(prediction, answer dicts) after `mode`'s normalisation; the input dicts are not modified."""
    answers = [dict(a) for a in answers]
    if mode == "official_2017":
        if len({a["answer"] for a in answers}) > 1:
            for a in answers:
                a["answer"] = process_punctuation(a["answer"])
        return normalize(clean_whitespace(prediction)), answers
    for a in answers:
        a["answer"] = clean_whitespace(a["answer"])
    prediction = clean_whitespace(prediction)
    if mode == "openflamingo" or len({a["answer"] for a in answers}) > 1:
        for a in answers:
            a["answer"] = normalize(a["answer"])
        prediction = normalize(prediction)
    return prediction, answers


def question_accuracy(prediction: str, answers: list[dict], mode: str) -> float:
    """One question's VQA accuracy in [0, 1] under `mode` (see the module docstring).

    Args:
        prediction: the (post-processed) model answer.
        answers: the annotation's answer dicts (`answer`, and usually `answer_id`, `answer_confidence`).
        mode: one of MODES.
    Returns:
        The mean over the human answers of min(1, #matching other answers / 3).
    Raises:
        ValueError: unknown mode, or no human answers.
    """
    if mode not in MODES:
        raise ValueError(f"unknown VQA accuracy mode {mode!r}; choose one of {', '.join(MODES)}")
    if not answers:
        raise ValueError("a question has no human answers")
    prediction, answers = _normalized_answers(prediction, answers, mode)
    scores = []
    for gt in answers:
        matches = sum(1 for other in answers if other != gt and other["answer"] == prediction)
        scores.append(min(1.0, matches / 3))
    return sum(scores) / len(scores)
