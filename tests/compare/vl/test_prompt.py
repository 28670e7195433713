"""The VL prompt and the tolerant answer parser, on answers shaped like real chat models' output."""

from __future__ import annotations

import pytest

from handler.compare.vl.prompt import AnswerInvalid, build_prompt, parse_answer
from handler.config import ComparisonConfig

FULL = (
    '{"similarity": 0.62, "differences": [{"aspect": "color", "element": "car", '
    '"description": "The car is red in image A and blue in image B."}, {"aspect": "presence", '
    '"element": "dog", "description": "A dog appears in image B only."}], '
    '"summary": "Same street; the car changed colour and a dog was added."}'
)


def test_prompt_names_the_configured_focus_and_aspects() -> None:
    config = ComparisonConfig(
        focus_elements=["price tags", "logos"], comparison_aspects=["text", "colour"]
    )
    prompt = build_prompt(config)
    assert "Pay attention to: price tags, logos." in prompt
    assert "aspects: text, colour." in prompt
    for key in ('"similarity"', '"differences"', '"aspect"', '"element"', '"description"'):
        assert key in prompt
    assert build_prompt(ComparisonConfig()) != prompt


def test_plain_json() -> None:
    answer = parse_answer(FULL)
    assert answer.similarity == pytest.approx(0.62)
    assert [(d.aspect, d.element) for d in answer.differences] == [
        ("color", "car"),
        ("presence", "dog"),
    ]
    assert answer.summary.startswith("Same street")


def test_code_fence_with_chatter_around_it() -> None:
    text = (
        "Sure! After comparing image A with image B, here is my analysis:\n\n```json\n"
        f"{FULL}\n```\n\nLet me know if you need anything else."
    )
    assert parse_answer(text) == parse_answer(FULL)


def test_chatter_with_braces_before_the_answer() -> None:
    text = "The images {A and B} look alike.\n" + FULL
    assert parse_answer(text).similarity == pytest.approx(0.62)


def test_answer_cut_off_in_the_summary_keeps_what_was_said() -> None:
    """``generate`` stopped by ``max_new_tokens`` mid-answer: the complete fields still count."""
    cut = FULL[: FULL.index("a dog was added")]
    answer = parse_answer(cut)
    assert answer.similarity == pytest.approx(0.62)
    assert len(answer.differences) == 2
    assert answer.summary.rstrip() == "Same street; the car changed colour and"


def test_answer_cut_off_inside_a_difference() -> None:
    cut = FULL[: FULL.index("A dog appears") + 5]
    answer = parse_answer(cut)
    assert answer.differences[1].description == "A dog"
    assert answer.summary == ""


def test_python_style_quotes_and_trailing_commas() -> None:
    text = "{'similarity': 0.9, 'differences': [], 'summary': 'Nearly the same.',}"
    answer = parse_answer(text)
    assert (answer.similarity, answer.differences, answer.summary) == (0.9, [], "Nearly the same.")


@pytest.mark.parametrize(("raw", "expected"), [("85", 0.85), ('"85%"', 0.85), ('"0.4"', 0.4)])
def test_similarity_as_percentage_or_string(raw: str, expected: float) -> None:
    assert parse_answer(f'{{"similarity": {raw}, "summary": "x"}}').similarity == expected


def test_differences_as_plain_strings_and_empty_entries() -> None:
    text = (
        '{"similarity": 0.5, "differences": ["The sign text changed.", "", '
        '{"element": "logo"}, {"aspect": null}], "summary": null}'
    )
    answer = parse_answer(text)
    assert [(d.aspect, d.element, d.description) for d in answer.differences] == [
        ("", "", "The sign text changed."),
        ("", "logo", "logo"),
    ]
    assert answer.summary == ""


@pytest.mark.parametrize(
    "text",
    [
        "",
        "The two images are very similar, with only minor differences in lighting.",
        '{"differences": [], "summary": "no score given"}',
        '{"similarity": "high", "summary": "words instead of a number"}',
        '{"similarity": 250, "summary": "out of range"}',
        '["similarity", 0.5]',
        'ary\x0b\x1f,ond /",\u044e\u0431 random-weight gibberish',
    ],
)
def test_unusable_answers_are_rejected(text: str) -> None:
    with pytest.raises(AnswerInvalid):
        parse_answer(text)
