"""Loading constitutions: our YAML, Anthropic's paper JSON, Hugging Face's llm-swarm JSON.

Every fixture is written into tmp_path with invented text in the real layouts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cai_cli.constitution import default_comparison, load_constitution
from cai_cli.errors import UserError

OURS = """\
name: tiny
description: Two principles for tests.
principles:
  - id: kindness
    critique: Point out anything unkind in the last reply.
    revision: Rewrite the reply to be kind.
    comparison: Which reply is kinder?
  - id: accuracy
    critique: List any false claims in the last reply.
    revision: Rewrite the reply so every claim is true.
few_shot:
  - principle: kindness
    prompt: Describe my neighbour's garden.
    answer: It is an ugly mess.
    critique: The reply insults the neighbour.
    revision: It has a lot of plants growing freely.
comparison_examples:
  - principle: kindness
    prompt: Say something about rainy days.
    option_a: Rainy days are pointless.
    option_b: Rainy days are good for reading.
    answer: B
    reasoning: B is friendlier.
"""

ANTHROPIC_INSTRUCTIONS = {
    "tidy0": {
        "prompt": ["\n\nCritiqueRequest: Say whether the last reply was messy.\n\nCritique:"],
        "edit_request": "\n\nRevisionRequest: Rewrite the reply more tidily.\n\nRevision:",
    },
    "tidy1": {
        "prompt": ["\n\nCritiqueRequest: Say whether the last reply rambled.\n\nCritique:"],
        "edit_request": "\n\nRevisionRequest: Rewrite the reply more briefly.\n\nRevision:",
    },
}

ANTHROPIC_FEW_SHOT = [
    # two conversation turns, one round, the paper's trailing "Human:" stop marker
    (
        "\n\nHuman: Hello there.\n\nAssistant: Hi.\n\nHuman: Name a fruit.\n\nAssistant: A turnip."
        "\n\nCritiqueRequest: Was the last reply correct?\n\nCritique: A turnip is not a fruit."
        "\n\nRevisionRequest: Fix the reply.\n\nRevision: An apple.\n\nHuman:"
    ),
    # one turn, two rounds
    (
        "\n\nHuman: Count to two.\n\nAssistant: One, three."
        "\n\nCritiqueRequest: Check the count.\n\nCritique: Three is wrong."
        "\n\nRevisionRequest: Correct it.\n\nRevision: One, two, three."
        "\n\nCritiqueRequest: Check the length.\n\nCritique: It goes past two."
        "\n\nRevisionRequest: Shorten it.\n\nRevision: One, two."
    ),
]

ANTHROPIC_RL_INSTRUCTIONS = ["\nChoose the tidier response. Options:"]

ANTHROPIC_RL_FEW_SHOT = [
    {"prompt": "\n\nHuman: Sort 2 1.\n\nAssistant:", "corrects": ["1 2"], "incorrects": ["2 1"]},
    {"prompt": "\n\nHuman: Add 1 1.\n\nAssistant:", "corrects": ["2"], "incorrects": ["11"]},
]

ANTHROPIC_RL_COT_FEW_SHOT = [
    {
        "prompt": "\n\nHuman: Consider the following conversation between a human (H) and an "
        "assistant (A):\n\nH: Is ice cold?\n\n{}\n (A) [[[No, it is hot.]]]\n (B) [[[Yes.]]]"
        "\n\nAssistant: Let's think step by step: (A) is false, (B) is true.\n\nHuman:\n"
        "So the answer is: (B)"
    }
]

HF = {
    "constitutions": [
        {"critic": "Is the response too loud?", "revision": "Rewrite the response quietly."},
        {"critic": "Is the response too long?", "revision": "Rewrite the response shorter."},
    ],
    "system_chat": [
        [
            {"role": "user", "content": "Greet me."},
            {"role": "assistant", "content": "HELLO!!!"},
            {"role": "user", "content": "Is the response too loud?"},
            {"role": "assistant", "content": "Yes, it shouts."},
            {"role": "user", "content": "Rewrite the response quietly."},
            {"role": "assistant", "content": "Hello."},
        ],
        [
            {"role": "user", "content": "Pick a colour."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Why that one?"},
            {"role": "assistant", "content": "Blue is the only good colour, everyone knows."},
            {"role": "user", "content": "Is the response too long?"},
            {"role": "assistant", "content": "It is long enough but overconfident."},
            {"role": "user", "content": "Rewrite the response shorter."},
            {"role": "assistant", "content": "I like how calm it looks."},
        ],
    ],
}


def write(tmp_path: Path, name: str, content: str | object) -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def error_for(paths) -> str:
    with pytest.raises(UserError) as info:
        load_constitution(paths)
    message = str(info.value)
    assert "\n" not in message, "user errors are one line"
    return message


# ---------------------------------------------------------------------------------------------
# Our format


def test_our_yaml(tmp_path):
    c = load_constitution(write(tmp_path, "tiny.yaml", OURS))
    assert (c.name, c.source_format) == ("tiny", "cai_cli")
    assert [p.id for p in c.principles] == ["kindness", "accuracy"]
    kindness = c.principle("kindness")
    assert kindness.critique_request == "Point out anything unkind in the last reply."
    assert kindness.revision_request == "Rewrite the reply to be kind."
    assert kindness.comparison == "Which reply is kinder?"
    # no comparison given: derived from the revision request
    accuracy = c.principle("accuracy")
    assert accuracy.comparison == default_comparison(accuracy.revision_request)
    assert accuracy.revision_request in accuracy.comparison

    (shot,) = c.few_shot
    assert shot.prompt == "Describe my neighbour's garden."
    assert shot.answer == "It is an ugly mess."
    assert shot.critique_request == kindness.critique_request  # from the named principle
    assert shot.revision_request == kindness.revision_request
    assert shot.revision == "It has a lot of plants growing freely."

    (example,) = c.comparison_examples
    assert example.question == kindness.comparison
    assert (example.option_b, example.answer, example.reasoning) == (
        "Rainy days are good for reading.",
        "B",
        "B is friendlier.",
    )


def test_unknown_principle_id_names_known_ids(tmp_path):
    c = load_constitution(write(tmp_path, "tiny.yaml", OURS))
    with pytest.raises(UserError, match="unknown principle 'kindnes'.*kindness, accuracy"):
        c.principle("kindnes")


def test_several_files_merge(tmp_path):
    ours = write(tmp_path, "tiny.yaml", OURS)
    hf = write(tmp_path, "hf.json", HF)
    c = load_constitution([str(ours), hf])
    assert [p.id for p in c.principles] == ["kindness", "accuracy", "hf-0", "hf-1"]
    assert len(c.few_shot) == 3
    assert (c.name, c.source_format) == ("tiny", "cai_cli")


# ---------------------------------------------------------------------------------------------
# Anthropic's paper layout


def test_anthropic_instructions_alone(tmp_path):
    c = load_constitution(
        write(tmp_path, "CritiqueRevisionInstructions.json", ANTHROPIC_INSTRUCTIONS)
    )
    assert c.source_format == "anthropic"
    assert c.name == "CritiqueRevisionInstructions"
    assert [p.id for p in c.principles] == ["tidy0", "tidy1"]
    first = c.principle("tidy0")
    # the CritiqueRequest:/Critique: and RevisionRequest:/Revision: markers are stripped
    assert first.critique_request == "Say whether the last reply was messy."
    assert first.revision_request == "Rewrite the reply more tidily."
    assert first.comparison == default_comparison("Rewrite the reply more tidily.")
    assert c.few_shot == () and c.comparison_examples == ()


def test_anthropic_instructions_and_few_shot_merged(tmp_path):
    c = load_constitution(
        [
            write(tmp_path, "CritiqueRevisionInstructions.json", ANTHROPIC_INSTRUCTIONS),
            write(tmp_path, "CritiqueRevisionFewShotPrompts.json", ANTHROPIC_FEW_SHOT),
        ]
    )
    assert len(c.principles) == 2
    first, second, third = c.few_shot  # one example per critique/revision round
    # earlier turns stay in the prompt as a transcript; the last assistant turn is the answer
    assert first.prompt == "Human: Hello there.\n\nAssistant: Hi.\n\nHuman: Name a fruit."
    assert first.answer == "A turnip."
    assert first.critique_request == "Was the last reply correct?"
    assert first.critique == "A turnip is not a fruit."
    assert first.revision_request == "Fix the reply."
    assert first.revision == "An apple."  # the trailing "Human:" marker is not part of it
    assert (second.prompt, second.answer, second.revision) == (
        "Count to two.",
        "One, three.",
        "One, two, three.",
    )
    # the second round critiques the first round's revision
    assert (third.answer, third.critique_request, third.revision) == (
        "One, two, three.",
        "Check the length.",
        "One, two.",
    )


def test_anthropic_comparison_files(tmp_path):
    c = load_constitution(
        [
            write(tmp_path, "instructions.json", ANTHROPIC_INSTRUCTIONS),
            write(tmp_path, "RLMadisonInstructions.json", ANTHROPIC_RL_INSTRUCTIONS),
            write(tmp_path, "RLMadisonFewShotPrompts.json", ANTHROPIC_RL_FEW_SHOT),
            write(tmp_path, "RLMadisonPrecogFewShotPrompts.json", ANTHROPIC_RL_COT_FEW_SHOT),
        ]
    )
    # comparison questions go to the principles in order, cycling, without "Options:"
    assert [p.comparison for p in c.principles] == ["Choose the tidier response."] * 2
    sort, add, cot = c.comparison_examples
    # the correct option alternates between A and B
    assert (sort.prompt, sort.option_a, sort.option_b, sort.answer) == (
        "Sort 2 1.",
        "1 2",
        "2 1",
        "A",
    )
    assert (add.option_a, add.option_b, add.answer) == ("11", "2", "B")
    assert sort.question == "Choose the tidier response." and sort.reasoning == ""
    assert (cot.prompt, cot.option_a, cot.option_b, cot.answer) == (
        "Is ice cold?",
        "No, it is hot.",
        "Yes.",
        "B",
    )
    assert cot.reasoning == "(A) is false, (B) is true."


# ---------------------------------------------------------------------------------------------
# Hugging Face's llm-swarm layout


def test_hf_layout(tmp_path):
    c = load_constitution(write(tmp_path, "constitution.json", HF))
    assert c.source_format == "hf"
    assert [p.id for p in c.principles] == ["hf-0", "hf-1"]
    assert c.principle("hf-0").critique_request == "Is the response too loud?"
    assert c.principle("hf-1").comparison == default_comparison("Rewrite the response shorter.")
    loud, colour = c.few_shot
    assert (loud.prompt, loud.answer, loud.critique, loud.revision) == (
        "Greet me.",
        "HELLO!!!",
        "Yes, it shouts.",
        "Hello.",
    )
    assert loud.critique_request == "Is the response too loud?"
    assert loud.revision_request == "Rewrite the response quietly."
    assert colour.prompt == "Human: Pick a colour.\n\nAssistant: Blue.\n\nHuman: Why that one?"
    assert colour.answer == "Blue is the only good colour, everyone knows."


def test_hf_bare_list_layout(tmp_path):
    c = load_constitution(write(tmp_path, "old.json", HF["constitutions"]))
    assert [p.id for p in c.principles] == ["hf-0", "hf-1"]
    assert c.source_format == "hf" and c.few_shot == ()


# ---------------------------------------------------------------------------------------------
# The layout comes from the content, not the extension


@pytest.mark.parametrize(
    ("name", "content", "source_format"),
    [
        ("ours.json", OURS, "cai_cli"),  # YAML text in a .json file
        ("ours.txt", json.dumps(yaml.safe_load(OURS)), "cai_cli"),  # JSON syntax
        ("anthropic.yaml", ANTHROPIC_INSTRUCTIONS, "anthropic"),
        ("hf.yml", HF, "hf"),
        ("hf", json.dumps(HF, indent="\t"), "hf"),  # tab-indented JSON, no extension
    ],
)
def test_format_detected_from_content(tmp_path, name, content, source_format):
    assert load_constitution(write(tmp_path, name, content)).source_format == source_format


# ---------------------------------------------------------------------------------------------
# Errors: one line, naming the file and what is wrong


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    message = error_for(path)
    assert str(path) in message and "not found" in message and "`constitution:`" in message


def test_directory_instead_of_file(tmp_path):
    message = error_for(tmp_path)
    assert str(tmp_path) in message and "directory" in message


def test_relative_path_not_found_names_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = error_for("constitutions/nope.yaml")
    assert "not found" in message and f"relative to the current directory, {tmp_path}" in message


def test_non_utf8_byte_names_line_and_offset(tmp_path):
    path = tmp_path / "latin1.yaml"
    content = "name: caf\u00e9\nprinciples: []\n".encode("latin-1")
    path.write_bytes(content)
    message = error_for(path)
    assert message.startswith(f"{path}:1: not UTF-8")
    assert f"byte offset {content.index(0xE9)}" in message


def test_no_files_given():
    assert "constitution" in error_for([])


def test_yaml_syntax_error_names_line_and_column(tmp_path):
    path = write(tmp_path, "bad.yaml", "name: x\nprinciples:\n  - id: a\n   critique: [unclosed\n")
    message = error_for(path)
    assert message.startswith(f"{path}:4:") and "invalid YAML" in message


def test_json_syntax_error_names_line_and_column(tmp_path):
    path = write(tmp_path, "bad.json", '{"constitutions": [\n  {"critic": "x" "revision": "y"}\n]}')
    message = error_for(path)
    assert message.startswith(f"{path}:2:") and "invalid JSON" in message


@pytest.mark.parametrize("content", ["colour: blue\n", "[1, 2, 3]", "just some words"])
def test_unknown_layout_lists_accepted_formats(tmp_path, content):
    path = write(tmp_path, "odd.yaml", content)
    message = error_for(path)
    assert str(path) in message and "unrecognised constitution layout" in message
    for hint in ("principles", "critic", "edit_request"):
        assert hint in message


def test_empty_file(tmp_path):
    path = write(tmp_path, "empty.yaml", "")
    assert f"{path}: the file is empty" in error_for(path)


def test_no_principles_after_merging(tmp_path):
    few_shot = write(tmp_path, "fs.json", ANTHROPIC_FEW_SHOT)
    questions = write(tmp_path, "rl.json", ANTHROPIC_RL_INSTRUCTIONS)
    message = error_for([few_shot, questions])
    assert str(few_shot) in message and str(questions) in message
    assert "no principles found" in message


def test_empty_principle_list_in_our_format(tmp_path):
    path = write(tmp_path, "none.yaml", "name: none\nprinciples: []\n")
    message = error_for(path)
    assert str(path) in message and "no principles found" in message


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("    revision: Rewrite the reply to be kind.\n", "", "principles[0]: missing 'revision'"),
        (
            "    comparison: Which",
            "    comparision: Which",
            "principles[0]: unknown key 'comparision'",
        ),
        (
            "critique: List any false claims in the last reply.",
            'critique: " "',
            "principles[1].critique: is empty",
        ),
        ("  - id: accuracy", "  - id: kindness", "principles[1]: duplicate id 'kindness'"),
        (
            "  - principle: kindness\n    prompt: Describe",
            "  - principle: kind\n    prompt: Describe",
            "few_shot[0]: unknown principle 'kind'",
        ),
        ("    answer: B\n", "    answer: C\n", "comparison_examples[0].answer: must be A or B"),
        ("name: tiny\n", "name: tiny\nversion: 2\n", "top level: unknown key 'version'"),
    ],
)
def test_our_format_errors_name_file_and_entry(tmp_path, old, new, expected):
    assert old in OURS
    path = write(tmp_path, "tiny.yaml", OURS.replace(old, new))
    assert error_for(path).startswith(f"{path}: {expected}")


def test_empty_principle_text_in_json_layouts(tmp_path):
    instructions = json.loads(json.dumps(ANTHROPIC_INSTRUCTIONS))
    instructions["tidy1"]["edit_request"] = "\n\nRevisionRequest:\n\nRevision:"
    path = write(tmp_path, "instructions.json", instructions)
    assert error_for(path).startswith(f"{path}: tidy1.edit_request: empty")

    hf = {"constitutions": [{"critic": "Is it loud?", "revision": ""}]}
    path = write(tmp_path, "hf.json", hf)
    assert error_for(path).startswith(f"{path}: constitutions[0].revision: empty")


def test_duplicate_ids_across_files(tmp_path):
    first = write(tmp_path, "a.json", ANTHROPIC_INSTRUCTIONS)
    second = write(tmp_path, "b.json", ANTHROPIC_INSTRUCTIONS)
    message = error_for([first, second])
    assert message.startswith(f"{second}: principle id 'tidy0'") and str(first) in message


def test_malformed_anthropic_transcript(tmp_path):
    path = write(tmp_path, "fs.json", ["\n\nHuman: Hi.\n\nCritiqueRequest: x\n\nCritique: y"])
    message = error_for(path)
    assert message.startswith(f"{path}: transcript [0]: expected Human:/Assistant: turns")


def test_malformed_hf_system_chat(tmp_path):
    hf = {"constitutions": HF["constitutions"], "system_chat": [HF["system_chat"][0][:4]]}
    path = write(tmp_path, "hf.json", hf)
    message = error_for(path)
    assert message.startswith(f"{path}: system_chat[0]: expected alternating user/assistant")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        # an instructions file with one entry that is not an object
        ({**ANTHROPIC_INSTRUCTIONS, "tidy2": "Be tidy."}, "tidy2: expected an object"),
        # RLMadison few-shot answers given as text or a number instead of a list
        ([{**ANTHROPIC_RL_FEW_SHOT[0], "corrects": "1 2"}], "[0].corrects: expected a non-empty"),
        ([{**ANTHROPIC_RL_FEW_SHOT[0], "incorrects": 5}], "[0].incorrects: expected a non-empty"),
        ({**HF, "system_chat": "Greet me."}, "'system_chat' must be a list"),
    ],
)
def test_wrong_types_in_json_layouts(tmp_path, content, expected):
    path = write(tmp_path, "c.json", content)
    assert error_for(path).startswith(f"{path}: {expected}")


def test_hf_unknown_keys_of_mixed_types(tmp_path):
    path = write(tmp_path, "hf.yaml", "constitutions: []\n1: x\nzz: y\n")
    assert error_for(path).startswith(f"{path}: unknown key '1'")


# ---------------------------------------------------------------------------------------------
# The constitution we ship


def test_shipped_harmless_constitution():
    path = Path(__file__).parents[1] / "constitutions" / "harmless.yaml"
    c = load_constitution(path)
    assert c.source_format == "cai_cli" and c.name == "harmless"
    assert len(c.principles) >= 12
    for principle in c.principles:
        assert principle.critique_request.strip()
        assert principle.revision_request.strip()
        assert principle.comparison.strip()
    assert c.few_shot
    for example in c.few_shot:
        assert example.answer.strip() and example.revision.strip()
