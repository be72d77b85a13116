"""Row formats: detection and normalisation of single rows to chat messages (no files involved)."""

from __future__ import annotations

import json

import pytest

from kubetune.formats import FORMATS, REASONS, RowError, canonical, detect, matching_format, normalise


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def s(text):
    return {"role": "system", "content": text}


# ----------------------------------------------------------------------------------------------------------
# Normalisation of good rows


@pytest.mark.parametrize(
    ("fmt", "row", "expected"),
    [
        ("lima", {"conversations": ["hi", "hello"], "source": "stackexchange"}, [u("hi"), a("hello")]),
        ("lima", {"conversations": ["q1", "a1", "q2", "a2"]}, [u("q1"), a("a1"), u("q2"), a("a2")]),
        ("instruction", {"instruction": "Say hi", "response": "Hi!"}, [u("Say hi"), a("Hi!")]),
        (
            "instruction",
            {"instruction": "x", "response": "y", "system": "Be brief."},
            [s("Be brief."), u("x"), a("y")],
        ),
        ("alpaca", {"instruction": "Add", "input": "2+2", "output": "4"}, [u("Add\n\n2+2"), a("4")]),
        ("alpaca", {"instruction": "Add", "input": "", "output": "4"}, [u("Add"), a("4")]),
        ("alpaca", {"instruction": "Add", "input": None, "output": "4"}, [u("Add"), a("4")]),
        ("alpaca", {"instruction": "Add", "output": "4"}, [u("Add"), a("4")]),
        (
            "alpaca",
            {"instruction": "and 3?", "output": "5", "history": [["2+2?", "4"]], "system": "math"},
            [s("math"), u("2+2?"), a("4"), u("and 3?"), a("5")],
        ),
        (
            "prompt_completion",
            {"prompt": "The sky is", "completion": " blue."},
            [u("The sky is"), a(" blue.")],
        ),
        (
            "prompt_completion",
            {
                "prompt": [{"role": "user", "content": "Hi"}],
                "completion": [{"role": "assistant", "content": "Yo"}],
            },
            [u("Hi"), a("Yo")],
        ),
        ("question_answer", {"question": "2+2?", "answer": "4"}, [u("2+2?"), a("4")]),
        (
            "messages",
            {"messages": [s("sys"), u("q1"), a("a1"), u("q2"), a("a2")]},
            [s("sys"), u("q1"), a("a1"), u("q2"), a("a2")],
        ),
        (
            "messages",
            {
                "conversations": [
                    {"from": "system", "value": "sys"},
                    {"from": "human", "value": "q"},
                    {"from": "gpt", "value": "r"},
                ]
            },
            [s("sys"), u("q"), a("r")],
        ),
        (
            "messages",
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                    },
                    {"role": "assistant", "content": "c", "name": "bot", "weight": 1},
                ]
            },
            [u("ab"), a("c")],
        ),
        # CSV cells carry list columns as JSON text.
        ("lima", {"conversations": json.dumps(["q", "r"])}, [u("q"), a("r")]),
    ],
)
def test_normalise_formats(fmt, row, expected):
    assert normalise(fmt, row) == expected


def test_content_is_kept_verbatim():
    row = {"instruction": "  padded\n", "response": "\tkeep me  \n"}
    assert normalise("instruction", row) == [u("  padded\n"), a("\tkeep me  \n")]


def test_system_prompt_prepended_only_without_a_system_message():
    assert normalise("question_answer", {"question": "q", "answer": "r"}, "You help.") == [
        s("You help."),
        u("q"),
        a("r"),
    ]
    with_own = {"messages": [s("Own."), u("q"), a("r")]}
    assert normalise("messages", with_own, "You help.") == [s("Own."), u("q"), a("r")]


def test_canonical_is_stable_and_content_sensitive():
    one = [u("q"), a("r")]
    assert canonical(one) == canonical([{"content": "q", "role": "user"}, {"content": "r", "role": "assistant"}])
    assert canonical(one) != canonical([u("q"), a("r ")])
    assert json.loads(canonical(one)) == one


# ----------------------------------------------------------------------------------------------------------
# Detection


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        ({"messages": [], "prompt": "x"}, "messages"),
        ({"conversations": ["a", "b"], "source": "x"}, "lima"),
        ({"conversations": [{"from": "human", "value": "x"}]}, "messages"),
        ({"instruction": "", "input": "", "output": ""}, "alpaca"),
        ({"instruction": "", "output": "", "response": ""}, "alpaca"),
        ({"instruction": "", "response": ""}, "instruction"),
        ({"prompt": "", "completion": ""}, "prompt_completion"),
        ({"question": "", "answer": "", "id": 3}, "question_answer"),
        ({"question": "", "response": ""}, None),
        ({}, None),
    ],
)
def test_matching_format(columns, expected):
    assert matching_format(columns) == expected


def test_detect_by_majority_with_order_for_ties():
    qa = {"question": "q", "answer": "a"}
    pc = {"prompt": "p", "completion": "c"}
    assert detect([qa, pc, pc, {"junk": 1}]) == "prompt_completion"
    assert detect([qa, pc]) == "prompt_completion"  # tie: earlier in FORMATS wins
    assert FORMATS.index("prompt_completion") < FORMATS.index("question_answer")
    assert detect([{"junk": 1}]) is None
    assert detect([]) is None


# ----------------------------------------------------------------------------------------------------------
# Bad rows: each gives a RowError with a known code and a reason naming the field


@pytest.mark.parametrize(
    ("fmt", "row", "code", "fragment"),
    [
        ("alpaca", ["not", "a", "dict"], "not_object", "not an object (got list"),
        ("alpaca", "text", "not_object", "not an object (got string"),
        ("alpaca", {"instruction": "x"}, "missing_field", "missing field `output`"),
        ("alpaca", {"instruction": "x", "output": None}, "missing_field", "missing field `output`"),
        ("alpaca", {"instruction": "   ", "output": "y"}, "empty_field", "field `instruction` is empty"),
        (
            "alpaca",
            {"instruction": "x", "output": 4},
            "wrong_type",
            "field `output` must be a string, got number",
        ),
        (
            "alpaca",
            {"instruction": "x", "input": ["y"], "output": "z"},
            "wrong_type",
            "field `input` must be",
        ),
        (
            "alpaca",
            {"instruction": "x", "output": "y", "history": [["only one"]]},
            "wrong_type",
            "`history[0]`",
        ),
        ("instruction", {"instruction": "x", "response": "\ud800"}, "invalid_text", "unpaired surrogate"),
        ("instruction", {"instruction": "x", "response": "y", "system": 5}, "wrong_type", "field `system`"),
        ("question_answer", {"question": "q", "answer": {"text": "a"}}, "wrong_type", "field `answer`"),
        (
            "prompt_completion",
            {"prompt": [{"role": "user", "content": "x"}]},
            "missing_field",
            "`completion`",
        ),
        ("lima", {"conversations": "just text"}, "wrong_type", "field `conversations` must be a list"),
        ("lima", {"conversations": []}, "empty_field", "`conversations` is an empty list"),
        ("lima", {"conversations": ["q"]}, "no_assistant", "no assistant turn"),
        ("lima", {"conversations": ["q", "a", "q2"]}, "ends_with_user", "ends with a user turn (3 turns)"),
        ("lima", {"conversations": ["q", 7]}, "wrong_type", "`conversations[1]` must be a string"),
        ("lima", {"conversations": ["q", ""]}, "empty_content", "`conversations[1]` is empty"),
        (
            "messages",
            {"messages": [u("q"), u("q2"), a("r")]},
            "roles_out_of_order",
            "`messages[1]` is `user` after",
        ),
        (
            "messages",
            {"messages": [a("r")]},
            "roles_out_of_order",
            "`messages[0]` is `assistant` at the start",
        ),
        ("messages", {"messages": [u("q"), s("x"), a("r")]}, "roles_out_of_order", "only the first message"),
        ("messages", {"messages": [s("only system")]}, "no_assistant", "only a system message"),
        ("messages", {"messages": [s("x"), u("q")]}, "no_assistant", "no assistant turn"),
        ("messages", {"messages": [u("q"), a("r"), u("q2")]}, "ends_with_user", "ends with a user turn"),
        ("messages", {"messages": [u("q"), a("")]}, "empty_content", "`messages[1]`.content is empty"),
        ("messages", {"messages": [u("q"), {"role": "assistant"}]}, "empty_content", "`messages[1]`.content"),
        (
            "messages",
            {"messages": [u("q"), {"content": "r"}]},
            "missing_field",
            "`messages[1]` has no `role`",
        ),
        ("messages", {"messages": [u("q"), {"role": "bot", "content": "r"}]}, "bad_role", "'bot'; expected"),
        (
            "messages",
            {"messages": [u("q"), {"role": 3, "content": "r"}]},
            "bad_role",
            "`messages[1]`.role is 3",
        ),
        ("messages", {"messages": [u("q"), "r"]}, "wrong_type", "`messages[1]` must be an object"),
        (
            "messages",
            {"messages": [u("q"), {"role": "assistant", "content": 1.5}]},
            "wrong_type",
            "content must",
        ),
        (
            "messages",
            {"messages": [u("q"), {"role": "assistant", "content": [{"type": "image"}]}]},
            "wrong_type",
            "text part",
        ),
        ("messages", {"prompt": "x"}, "missing_field", "missing field `messages`"),
    ],
)
def test_bad_rows(fmt, row, code, fragment):
    with pytest.raises(RowError) as info:
        normalise(fmt, row)
    assert info.value.code == code
    assert code in REASONS
    assert fragment in info.value.reason
    assert "\n" not in info.value.reason


def test_long_values_are_clipped_in_reasons():
    with pytest.raises(RowError) as info:
        normalise("alpaca", {"instruction": "x", "output": ["y" * 10_000]})
    assert len(info.value.reason) < 200
