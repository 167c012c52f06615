"""Tests of answer scoring (igpo_rewards.scoring): hand-computed cases, format rules,
Hypothesis properties, and real ground truths: tests/data/search_qa_dev_sample.parquet, 305 rows
of the Search-R1-layout dev set across its seven sources (tests/data/README.md)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from igpo_rewards.scoring import (
    ANSWER_SPLIT,
    answer_f1,
    exact_match,
    extract_answer,
    is_well_formed,
    normalize_answer,
    outcome_reward,
    split_ground_truth,
)

STYLES = ("paper", "squad")
DATA_PATH = Path(__file__).resolve().parent / "data" / "search_qa_dev_sample.parquet"


# ---------------------------------------------------------------------------------------------
# normalize_answer
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The U.S.A.!", "the u s a"),
        ("Hello,   World\n", "hello world"),
        ("\t a\n\nb \u00a0c ", "a b c"),  # tabs, newlines, no-break space
        ("«Paris»—France…", "paris france"),  # Pi/Pf quotes, em dash (Pd), ellipsis (Po)
        ("l\u2019amour", "l amour"),  # right single quotation mark (Pf)
        ("¿Qué?", "qué"),  # inverted question mark (Po)
        ("中国。", "中国"),  # ideographic full stop (Po)
        ("$100 + 5%", "100 5"),  # ASCII symbols are in string.punctuation
        ("€100 🏈", "€100 🏈"),  # Unicode symbols (Sc, So) are not punctuation
        ("snake_case-name", "snake case name"),
        ("Saint–Étienne", "saint étienne"),  # en dash
        ("...", ""),
        ("", ""),
    ],
)
def test_normalize_paper(text, expected):
    assert normalize_answer(text) == expected
    assert normalize_answer(text, style="paper") == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The U.S.A.!", "usa"),  # punctuation deleted, not replaced by a space
        ("an apple a day", "apple day"),
        ("The theater, Anne and Athens", "theater anne and athens"),  # only whole articles
        ("people's", "peoples"),
        ("a-b", "ab"),
        ("the, cat", "cat"),
        ("«paris»", "«paris»"),  # Unicode punctuation is kept (SQuAD uses ASCII only)
        ("Saint–Étienne", "saint–étienne"),
        ("\t The  Cat\n", "cat"),
        ("The", ""),
    ],
)
def test_normalize_squad(text, expected):
    assert normalize_answer(text, style="squad") == expected


def test_normalize_errors():
    with pytest.raises(TypeError, match=r"text must be a str, got bytes"):
        normalize_answer(b"Paris")
    with pytest.raises(TypeError, match=r"text must be a str, got NoneType"):
        normalize_answer(None)
    with pytest.raises(ValueError, match=r"style must be one of 'paper', 'squad'; got 'SQuAD'"):
        normalize_answer("Paris", style="SQuAD")
    with pytest.raises(ValueError, match=r"style .* got None"):
        normalize_answer("Paris", style=None)


# ---------------------------------------------------------------------------------------------
# split_ground_truth
# ---------------------------------------------------------------------------------------------


class _HasToList:
    """A minimal array-like: split_ground_truth must duck-type on tolist(), not on numpy."""

    def __init__(self, value):
        self.value = value

    def tolist(self):
        return self.value


@pytest.mark.parametrize(
    ("ground_truth", "expected"),
    [
        ("Paris", ("Paris",)),
        ("a<|answer_split|> b <|answer_split|><|answer_split|>", ("a", "b")),
        ("George VI\n", ("George VI",)),
        (["x", " y "], ("x", "y")),
        (("x",), ("x",)),
        (["x", "", "  "], ("x",)),
        (["x<|answer_split|>y", "z"], ("x", "y", "z")),  # elements are split too
        (["dup", "dup"], ("dup", "dup")),  # order and duplicates kept
        (np.array(["a", "b"]), ("a", "b")),
        (np.array(["a", "b<|answer_split|>c"], dtype=object), ("a", "b", "c")),
        (np.array("a<|answer_split|>b"), ("a", "b")),  # 0-d array -> tolist() is a str
        (_HasToList(["p", "q"]), ("p", "q")),
        (_HasToList("p<|answer_split|>q"), ("p", "q")),
    ],
)
def test_split_ground_truth(ground_truth, expected):
    assert split_ground_truth(ground_truth) == expected


@pytest.mark.parametrize(
    "ground_truth", ["", "   ", " <|answer_split|>\n", [], [" "], np.array([], dtype=str)]
)
def test_split_ground_truth_empty(ground_truth):
    with pytest.raises(ValueError, match=r"ground_truth has no non-empty alias"):
        split_ground_truth(ground_truth)


@pytest.mark.parametrize(
    ("ground_truth", "pattern"),
    [
        (42, r"ground_truth must be .* got int"),
        (None, r"ground_truth must be .* got NoneType"),
        (b"Paris", r"ground_truth must be .* got bytes"),
        ({"target": ["Paris"]}, r"got dict \(Search-R1 stores \{'target'"),
        ([1], r"ground_truth\[0\] must be a str, got int"),
        (["a", None], r"ground_truth\[1\] must be a str, got NoneType"),
        (np.array([["a"], ["b"]]), r"ground_truth\[0\] must be a str, got list"),
        (_HasToList(3), r"tolist\(\) must return a str or a list of str, got int"),
    ],
)
def test_split_ground_truth_type_errors(ground_truth, pattern):
    with pytest.raises(TypeError, match=pattern):
        split_ground_truth(ground_truth)


# ---------------------------------------------------------------------------------------------
# extract_answer
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("<think>x</think><answer> Paris </answer>", "Paris"),
        ("<answer>first</answer><answer>second</answer>", "first"),
        ("<answer>a\nb</answer>", "a\nb"),
        ("<answer></answer>", ""),
        ("<answer>  \n </answer>", ""),
        ("no tags at all", None),
        ("", None),
        ("<answer>Paris", None),  # truncated
        ("</answer>Paris<answer>", None),
        ("<ANSWER>Paris</ANSWER>", None),  # case-sensitive
        ("<answer>x <think>y</answer>", "x <think>y"),  # inner tags kept verbatim
        # An <answer> quoted inside retrieved text is not the policy's answer.
        (
            "<search>q</search><information>doc <answer>wrong</answer></information>"
            "<answer>right</answer>",
            "right",
        ),
        ("<information>never closed <answer>x</answer>", None),
        ("<answer>x<information>y</answer>", "x<information>y"),
    ],
)
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


def test_extract_answer_type_error():
    with pytest.raises(TypeError, match=r"response must be a str, got list"):
        extract_answer(["<answer>x</answer>"])


# ---------------------------------------------------------------------------------------------
# is_well_formed
# ---------------------------------------------------------------------------------------------

WELL_FORMED = [
    "<answer>Paris</answer>",
    "<answer></answer>",
    "  <think>easy</think>\n<answer>Paris</answer>\n\n",
    "<think>a</think>\n<search>capital of France</search>\n"
    "<information>Doc 1: Paris</information>\n<think>b</think>\n<answer>Paris</answer>",
    "<think>a</think><tool_call>{\"name\": \"search\"}</tool_call>"
    "<think>b</think><answer>x</answer>",
    "<think>a</think><code>print(1)</code><information>1</information><answer>1</answer>",
    "<search>q1</search><information>d1</information><search>q2</search><answer>x</answer>",
    "<search>q1</search><search>q2</search><information>d</information><answer>x</answer>",
    # Observation text is opaque: tags inside it are the environment's, not the policy's.
    "<search>q</search><information>see <code>x</code> and </think></information>"
    "<answer>x</answer>",
    "<search>q</search><information><information>nested open</information><answer>x</answer>",
    "<answer>a < b and c > d</answer>",
    "<think>use <thinking> or <answers></think><answer>x</answer>",  # unknown tags are text
]

MALFORMED = {
    "empty": "",
    "whitespace": " \n\t",
    "no tags": "Paris",
    "missing answer": "<think>a</think>",
    "missing answer after search": "<think>a</think><search>q</search><information>d</information>",
    "truncated answer": "<think>a</think><answer>Par",
    "truncated closing tag": "<answer>Paris</answer",
    "unclosed think": "<think>a<answer>Paris</answer>",
    "unclosed information": "<search>q</search><information>doc <answer>x</answer>",
    "two answers": "<answer>x</answer><answer>y</answer>",
    "two answers with think": "<think>a</think><answer>x</answer>\n"
    "<think>b</think><answer>y</answer>",
    "text after answer": "<answer>Paris</answer> I hope this helps.",
    "eos token after answer": "<answer>Paris</answer><|im_end|>",
    "block after answer": "<answer>Paris</answer><think>done</think>",
    "answer before search": "<answer>Paris</answer><search>q</search><information>d</information>",
    "nested": "<think>a<search>q</search></think><answer>Paris</answer>",
    "nested same tag": "<think><think>a</think></think><answer>Paris</answer>",
    "answer inside think": "<think><answer>x</answer></think><answer>x</answer>",
    "interleaved": "<think>a<answer>b</think></answer>",
    "stray closing tag": "</think><answer>Paris</answer>",
    "stray closing inside answer": "<answer>x</think></answer>",
    "two thinks in a row": "<think>a</think><think>b</think><answer>x</answer>",
    "information without call": "<information>d</information><answer>x</answer>",
    "information after think": "<think>a</think><information>d</information><answer>x</answer>",
    "two informations": "<search>q</search><information>d</information><information>e</information>"
    "<answer>x</answer>",
    "leading text": "Let me think. <answer>Paris</answer>",
    "text between blocks": "<think>a</think> so <answer>Paris</answer>",
    "uppercase tags": "<Answer>Paris</Answer>",
    "chat template between turns": "<search>q</search><|im_end|>\n<answer>x</answer>",
}


@pytest.mark.parametrize("response", WELL_FORMED)
def test_well_formed(response):
    assert is_well_formed(response) is True
    assert extract_answer(response) is not None


@pytest.mark.parametrize("response", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed(response):
    assert is_well_formed(response) is False
    assert outcome_reward(response, "Paris") == -2.0
    assert outcome_reward(response, "Paris", format_penalty=0.0) == 0.0


def test_is_well_formed_type_error():
    with pytest.raises(TypeError, match=r"response must be a str, got NoneType"):
        is_well_formed(None)


_KIND_TAG = {
    "T": "think",
    "S": "search",
    "K": "tool_call",
    "X": "code",
    "I": "information",
    "A": "answer",
}


def _grammar_oracle(kinds: str) -> bool:
    """The format rules on the block sequence, written as separate checks."""
    if kinds.count("A") != 1 or not kinds.endswith("A"):
        return False
    for previous, kind in zip(" " + kinds, kinds):
        if kind == "I" and previous not in "SKX":  # observation right after a call
            return False
        if kind == "T" and previous == "T":
            return False
    return True


@settings(max_examples=300, deadline=None)
@given(
    kinds=st.text(alphabet="TSKXIA", max_size=7),
    contents=st.lists(st.text(alphabet="xyz <>/.\n", max_size=6), min_size=7, max_size=7),
    gaps=st.lists(st.sampled_from(["", " ", "\n", "\n\n", "\t"]), min_size=8, max_size=8),
    junk_at=st.one_of(st.none(), st.integers(0, 7)),
)
def test_is_well_formed_matches_grammar(kinds, contents, gaps, junk_at):
    """Blocks with tag-free content joined by whitespace: validity is decided by the grammar
    alone; a word outside the blocks always makes the response malformed."""
    if junk_at is not None:
        junk_at %= len(kinds) + 1  # only the first len(kinds) + 1 gaps are used
        gaps[junk_at] = gaps[junk_at] + "junk"
    pieces = [gaps[0]]
    for index, kind in enumerate(kinds):
        tag = _KIND_TAG[kind]
        pieces.append(f"<{tag}>{contents[index]}</{tag}>{gaps[index + 1]}")
    response = "".join(pieces)
    expected = _grammar_oracle(kinds) and junk_at is None
    assert is_well_formed(response) is expected
    if expected:
        assert extract_answer(response) == contents[len(kinds) - 1].strip()


# ---------------------------------------------------------------------------------------------
# answer_f1 / exact_match
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "ground_truth", "paper", "squad"),
    [
        # Set F1: {paris, france} vs {paris}: 2*1/(2+1). Multiset: 3 words vs 1: 2*1/(3+1).
        ("Paris paris France", "Paris", 2 / 3, 0.5),
        # Articles count in the paper's normalization only.
        ("the cat", "cat", 2 / 3, 1.0),
        # Repetition in the gold answer: sets {new, york} vs {york}; multisets 2 vs 3 words.
        ("york", "New York, York", 2 / 3, 0.5),
        # Max over aliases: alias 1 gives 2/(3+1), alias 2 gives 4/(3+2).
        ("new york city", "York<|answer_split|>New York", 0.8, 0.8),
        # Unicode dash splits words in paper style only.
        ("Saint–Étienne", "saint étienne", 1.0, 0.0),
        ("U.S.A.", "usa", 0.0, 1.0),
        ("Paris", "Lyon", 0.0, 0.0),
        ("", "Paris", 0.0, 0.0),
        ("...", "...", 0.0, 0.0),  # both normalize to nothing: never a match
    ],
)
def test_answer_f1_hand_computed(prediction, ground_truth, paper, squad):
    assert answer_f1(prediction, ground_truth) == pytest.approx(paper, abs=1e-12)
    assert answer_f1(prediction, ground_truth, style="paper") == pytest.approx(paper, abs=1e-12)
    assert answer_f1(prediction, ground_truth, style="squad") == pytest.approx(squad, abs=1e-12)


@pytest.mark.parametrize(
    ("prediction", "ground_truth", "paper", "squad"),
    [
        ("The Beatles.", "beatles", 0.0, 1.0),
        ("the beatles", "The Beatles!", 1.0, 1.0),
        ("«Paris»", "paris", 1.0, 0.0),
        ("paris paris", "paris", 0.0, 0.0),  # EM compares normalized strings, not sets
        ("paris", ["Lyon", "PARIS"], 1.0, 1.0),
        ("", "Paris", 0.0, 0.0),
        ("...", "!!!", 0.0, 0.0),
        ("The", "an", 0.0, 0.0),  # squad: both normalize to "", which never matches
    ],
)
def test_exact_match_hand_computed(prediction, ground_truth, paper, squad):
    assert exact_match(prediction, ground_truth) == paper
    assert exact_match(prediction, ground_truth, style="squad") == squad


def test_f1_em_errors():
    for function in (answer_f1, exact_match):
        with pytest.raises(TypeError, match=r"prediction must be a str, got NoneType .*extract"):
            function(None, "Paris")
        with pytest.raises(ValueError, match=r"style must be one of"):
            function("Paris", "Paris", style="exact")
        with pytest.raises(TypeError, match=r"ground_truth must be .* got int"):
            function("Paris", 3)
        with pytest.raises(ValueError, match=r"no non-empty alias"):
            function("Paris", "")


_words = st.lists(
    st.sampled_from(["paris", "Paris", "the", "a", "new", "york", "U.S.", "«x»", "—", "é"]),
    max_size=5,
).map(" ".join)
_texts = st.one_of(_words, st.text(max_size=12))


@settings(max_examples=300, deadline=None)
@given(prediction=_texts, first=_texts, second=_texts, style=st.sampled_from(STYLES))
def test_f1_em_properties(prediction, first, second, style):
    aliases = [alias for alias in (first, second) if alias.strip()]
    if not aliases:
        return
    f1 = answer_f1(prediction, aliases, style=style)
    em = exact_match(prediction, aliases, style=style)
    assert 0.0 <= f1 <= 1.0
    assert em in (0.0, 1.0)
    assert em <= f1
    # Max over aliases.
    assert f1 == max(answer_f1(prediction, alias, style=style) for alias in aliases)
    assert em == max(exact_match(prediction, alias, style=style) for alias in aliases)
    # Symmetric for a single alias (when both sides are valid ground truths).
    if prediction.strip():
        assert answer_f1(prediction, first.strip() or "x", style=style) == answer_f1(
            first.strip() or "x", prediction, style=style
        )
    # Paper style: F1 is 1 exactly when the normalized word sets agree.
    if style == "paper":
        predicted = set(normalize_answer(prediction).split())
        best = any(predicted and predicted == set(normalize_answer(a).split()) for a in aliases)
        assert (f1 == 1.0) == best


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=20), style=st.sampled_from(STYLES))
def test_normalize_properties(text, style):
    normalized = normalize_answer(text, style=style)
    assert normalized == normalized.strip()
    assert "  " not in normalized
    assert normalize_answer(normalized, style=style) == normalized  # idempotent
    if style == "paper":
        assert not any(ch in "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~" for ch in normalized)


# ---------------------------------------------------------------------------------------------
# outcome_reward
# ---------------------------------------------------------------------------------------------


def test_outcome_reward_hand_computed():
    response = (
        "<think>France</think><search>capital</search><information>Paris</information>"
        "<answer>Paris, France</answer>"
    )
    assert outcome_reward(response, "Paris") == pytest.approx(2 / 3)
    assert outcome_reward(response, "Paris", metric="em") == 0.0
    assert outcome_reward(response, "Lyon<|answer_split|>Paris France") == 1.0
    assert outcome_reward(response, ["Lyon", "paris (france)"], metric="em") == 1.0
    assert outcome_reward("<answer>The Paris</answer>", "paris", style="squad") == 1.0
    assert outcome_reward("<answer>The Paris</answer>", "paris") == pytest.approx(2 / 3)
    assert outcome_reward("<answer></answer>", "Paris") == 0.0  # well formed, empty answer
    assert outcome_reward("<answer>x</answer>", "y", format_penalty=-1) == 0.0
    assert outcome_reward("<answer>x", "y", format_penalty=-1) == -1.0
    assert isinstance(outcome_reward("<answer>x", "y", format_penalty=-1), float)
    # The answer quoted inside retrieved text is not scored.
    quoted = (
        "<search>q</search><information><answer>Paris</answer></information>"
        "<answer>Lyon</answer>"
    )
    assert outcome_reward(quoted, "Paris") == 0.0


def test_outcome_reward_errors():
    good = "<answer>Paris</answer>"
    with pytest.raises(TypeError, match=r"response must be a str, got NoneType"):
        outcome_reward(None, "Paris")
    with pytest.raises(ValueError, match=r"metric must be one of 'f1', 'em'; got 'EM'"):
        outcome_reward(good, "Paris", metric="EM")
    with pytest.raises(ValueError, match=r"style must be one of"):
        outcome_reward(good, "Paris", style="official")
    with pytest.raises(TypeError, match=r"format_penalty must be a real number, got bool"):
        outcome_reward(good, "Paris", format_penalty=True)
    with pytest.raises(TypeError, match=r"format_penalty must be a real number, got str"):
        outcome_reward(good, "Paris", format_penalty="-2")
    with pytest.raises(ValueError, match=r"format_penalty must be finite, got nan"):
        outcome_reward(good, "Paris", format_penalty=math.nan)
    # Ground truth is validated even when the response is malformed.
    with pytest.raises(TypeError, match=r"ground_truth must be .* got dict"):
        outcome_reward("not formatted", {"target": ["Paris"]})
    with pytest.raises(ValueError, match=r"no non-empty alias"):
        outcome_reward("not formatted", "")


# ---------------------------------------------------------------------------------------------
# Real ground truths: tests/data/search_qa_dev_sample.parquet
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dev_rows():
    import pyarrow.parquet as pq  # a missing file fails these tests: it ships with the repository


    table = pq.read_table(DATA_PATH, columns=["data_source", "reward_model"])
    sources = table.column("data_source").to_pylist()
    ground_truths = [entry["ground_truth"] for entry in table.column("reward_model").to_pylist()]
    return list(zip(sources, ground_truths))


def _respond(answer: str) -> str:
    return f"<think>Let me look it up.</think>\n<answer>{answer}</answer>"


def test_dev_set_layout(dev_rows):
    assert len(dev_rows) == 305
    assert {source for source, _ in dev_rows} == {
        "nq", "tq", "popqa", "hotpotqa", "2wiki", "musique", "Bamboogle",
    }
    assert all(isinstance(ground_truth, str) for _, ground_truth in dev_rows)


def test_dev_ground_truths_split(dev_rows):
    total = 0
    for _, ground_truth in dev_rows:
        aliases = split_ground_truth(ground_truth)
        pieces = [piece.strip() for piece in ground_truth.split("<|answer_split|>")]
        expected = [piece for piece in pieces if piece]
        assert list(aliases) == expected
        assert len(aliases) >= 1
        for alias in aliases:
            assert alias and alias == alias.strip() and ANSWER_SPLIT not in alias
        total += len(aliases)
    assert total == 763  # counted once from the file
    # The same row read as a list or a numpy array gives the same aliases.
    row = max((ground_truth for _, ground_truth in dev_rows), key=lambda g: g.count(ANSWER_SPLIT))
    pieces = row.split(ANSWER_SPLIT)
    assert split_ground_truth(pieces) == split_ground_truth(np.array(pieces, dtype=object))
    assert split_ground_truth(pieces) == split_ground_truth(row)


def test_dev_any_alias_scores_one(dev_rows):
    for _, ground_truth in dev_rows:
        aliases = split_ground_truth(ground_truth)
        # Every alias of short rows; first, middle and last alias of long ones.
        if len(aliases) > 8:
            aliases = (aliases[0], aliases[len(aliases) // 2], aliases[-1])
        for alias in aliases:
            response = _respond(alias)
            assert is_well_formed(response)
            for style in STYLES:
                assert outcome_reward(response, ground_truth, style=style) == 1.0
                assert outcome_reward(response, ground_truth, metric="em", style=style) == 1.0


def test_dev_every_alias_matches_itself(dev_rows):
    for _, ground_truth in dev_rows:
        for alias in split_ground_truth(ground_truth):
            for style in STYLES:
                assert answer_f1(alias, alias, style=style) == 1.0
                assert exact_match(alias, alias, style=style) == 1.0


def test_dev_wrong_answers_score_below_one(dev_rows):
    """Answer each question with the next question's first alias: unless that string happens
    to normalize to the same words as one of this question's aliases, F1 < 1 and EM = 0."""
    checked = 0
    for (_, ground_truth), (_, other) in zip(dev_rows, dev_rows[1:] + dev_rows[:1]):
        wrong = split_ground_truth(other)[0]
        aliases = split_ground_truth(ground_truth)
        wrong_words = set(normalize_answer(wrong).split())
        if any(set(normalize_answer(alias).split()) == wrong_words for alias in aliases):
            continue
        response = _respond(wrong)
        assert outcome_reward(response, ground_truth) < 1.0
        assert outcome_reward(response, ground_truth, metric="em") == 0.0
        assert outcome_reward(response, ground_truth, metric="em", style="squad") == 0.0
        checked += 1
    assert checked >= 295  # of 305 rows (all 305 in the sample; 97% is the bar, as on the full dev set)
    # An answer sharing no word with the aliases scores exactly 0.
    for _, ground_truth in dev_rows:
        assert outcome_reward(_respond("zzqx"), ground_truth) == 0.0


def test_dev_malformed_penalized(dev_rows):
    for _, ground_truth in dev_rows[::7]:
        alias = split_ground_truth(ground_truth)[0]
        for response in (
            f"<think>x</think><answer>{alias}",  # truncated
            f"<answer>{alias}</answer> Done.",  # text after the answer
            f"<answer>{alias}</answer><answer>{alias}</answer>",  # two answers
            f"{alias}",  # no tags
        ):
            assert outcome_reward(response, ground_truth) == -2.0
            assert outcome_reward(response, ground_truth, format_penalty=0.0) == 0.0


def test_dev_case_and_punctuation_invariance(dev_rows):
    case_checked = 0
    for _, ground_truth in dev_rows:
        alias = split_ground_truth(ground_truth)[0]
        variants = {
            "paper": [
                f'"{alias}."',
                alias.replace(" ", ", "),
                "«" + alias.replace(" ", " — ") + "»",
                f"({alias})!",
            ],
            "squad": [f'"{alias}."', alias.replace(" ", ", "), f"({alias})!"],
        }
        # A case change is only neutral when lowercasing undoes it (not so for e.g. 'ß' -> 'SS').
        if alias.upper().lower() == alias.lower():
            case_checked += 1
            for style in STYLES:
                variants[style] += [alias.upper(), alias.swapcase()]
        for style in STYLES:
            for variant in variants[style]:
                response = _respond(variant)
                assert outcome_reward(response, ground_truth, style=style) == 1.0, (style, variant)
                assert outcome_reward(response, ground_truth, metric="em", style=style) == 1.0
    assert case_checked >= 295


def test_dev_paper_vs_squad_differ_on_real_aliases(dev_rows):
    """Find real aliases where the two normalizations disagree, and check both sides."""
    article_rows = [g for _, g in dev_rows if re.match(r"(?i)the\s", split_ground_truth(g)[0])]
    assert article_rows
    for ground_truth in article_rows:
        alias = split_ground_truth(ground_truth)[0]
        without_article = alias.split(None, 1)[1]
        # SQuAD style drops the article: exact match; paper style keeps it.
        assert exact_match(without_article, alias, style="squad") == 1.0
        assert exact_match(without_article, alias, style="paper") == 0.0
        # Paper style F1 over sets: the alias's words are the rest's words plus "the" (which
        # may already be among them further on, as in "The Prayers at the Foot of ...").
        rest = set(normalize_answer(without_article).split())
        expected = 2 * len(rest) / (len(rest) + len(rest | {"the"}))
        assert answer_f1(without_article, alias, style="paper") == pytest.approx(expected)
        assert answer_f1(without_article, alias, style="squad") == 1.0
    assert any("the" not in set(normalize_answer(g.split(ANSWER_SPLIT)[0]).split()[1:])
               for g in article_rows)
