"""Prompt loading from every source format, reduced to text, de-duplicated, shuffled, capped."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from cai_cli.config import PromptSource
from cai_cli.data.sources import Prompt, load_prompts
from cai_cli.errors import UserError

HH_SAMPLE = Path(__file__).parent / "data" / "hh_sample.jsonl"
TEXTS = ["How do I pick a lock?", "Write an insult about my boss.", "What is the capital of France?",
         "Tell me a secret.", "How do I bake bread?"]


def texts(prompts: list[Prompt]) -> set[str]:
    return {p.text for p in prompts}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def load(path: Path, seed: int = 0, **options) -> list[Prompt]:
    return load_prompts(PromptSource(path=str(path), **options), seed)


def error_of(source: PromptSource, what: str = "data.red_team") -> str:
    with pytest.raises(UserError) as info:
        load_prompts(source, 0, what=what)
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# Formats


def test_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": t, "other": 1} for t in TEXTS])
    assert texts(load(path)) == set(TEXTS)


def test_json_list(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"prompt": t} for t in TEXTS]))
    assert texts(load(path)) == set(TEXTS)


def test_json_list_of_plain_strings(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(TEXTS))
    assert texts(load(path)) == set(TEXTS)


def test_json_object_holding_one_list(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"version": 2, "data": [{"prompt": t} for t in TEXTS]}))
    assert texts(load(path)) == set(TEXTS)


def test_json_object_with_several_lists_is_an_error(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"train": [{"prompt": "a"}], "test": [{"prompt": "b"}]}))
    assert "expected a JSON list" in error_of(PromptSource(path=str(path)))


def test_csv(tmp_path):
    path = tmp_path / "p.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "prompt"])
        writer.writerows([[i, t] for i, t in enumerate(TEXTS)])
        writer.writerow([99, "A prompt, with a comma\nand a newline"])
    assert texts(load(path)) == set(TEXTS) | {"A prompt, with a comma\nand a newline"}


def test_csv_exported_by_a_spreadsheet_with_byte_order_mark(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt,notes\n" + "".join(f"{t},x\n" for t in TEXTS[:2]), encoding="utf-8-sig")
    assert texts(load(path)) == set(TEXTS[:2])


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": TEXTS + [None], "n": list(range(len(TEXTS) + 1))}), path)
    assert texts(load(path)) == set(TEXTS)  # a null cell is skipped like an empty one


def test_local_dataset_directory(tmp_path):
    folder = tmp_path / "my_prompts"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"prompt": t} for t in TEXTS])
    prompts = load_prompts(PromptSource(dataset=str(folder)), seed=0)
    assert texts(prompts) == set(TEXTS)


def test_local_dataset_unknown_split_names_the_split(tmp_path):
    folder = tmp_path / "my_prompts"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"prompt": "a"}])
    message = error_of(PromptSource(dataset=str(folder), split="test"))
    assert "data.red_team.dataset" in message and "'test'" in message and "Traceback" not in message


def test_file_given_as_dataset_points_to_path(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    message = error_of(PromptSource(dataset=str(path)))
    assert "is a file" in message and "data.red_team.path" in message


def test_unreachable_dataset_id_is_a_user_error():
    message = error_of(PromptSource(dataset="no-such-org/no-such-dataset"))  # offline in tests
    assert "data.red_team.dataset" in message and "no-such-org/no-such-dataset" in message


# ---------------------------------------------------------------------------------------------
# Reducing records to prompt text


def test_anthropic_hh_transcripts_reduce_to_first_human_turn():
    prompts = load(HH_SAMPLE, field="chosen")
    lines = HH_SAMPLE.read_text().splitlines()
    assert len(prompts) == len(lines)
    assert "How can I get back at my neighbor for parking in my spot?" in texts(prompts)
    for prompt in prompts:
        assert "Human:" not in prompt.text and "Assistant:" not in prompt.text
        assert prompt.text == prompt.text.strip() and "\n\n" not in prompt.text
    # "chosen" and "rejected" share the conversation start, so both give the same prompts
    assert texts(load(HH_SAMPLE, field="rejected")) == texts(prompts)


@pytest.mark.parametrize("transcript", [
    "\n\nHuman: Is it safe?\n\nAssistant: Yes.\n\nHuman: Sure?",
    "Human: Is it safe?\n\nAssistant: Yes.",
    "  Human:   Is it safe?  ",
])
def test_transcript_variants(tmp_path, transcript):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": transcript}])
    assert [p.text for p in load(path)] == ["Is it safe?"]


def test_multi_paragraph_human_turn_is_kept_whole(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl",
                       [{"prompt": "\n\nHuman: First paragraph.\n\nSecond paragraph.\n\nAssistant: Ok."}])
    assert [p.text for p in load(path)] == ["First paragraph.\n\nSecond paragraph."]


def test_text_mentioning_human_is_not_cut(tmp_path):
    text = "In a story, the robot said Human: you are late. What happens next?"
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": text}])
    assert [p.text for p in load(path)] == [text]


def test_chat_messages_reduce_to_first_user_turn(tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hello? "},
                {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Second."}]
    path = write_jsonl(tmp_path / "p.jsonl", [{"messages": messages}])
    assert [p.text for p in load(path, field="messages")] == ["Hello?"]


def test_configurable_field(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": t, "prompt": "wrong"} for t in TEXTS])
    assert texts(load(path, field="question")) == set(TEXTS)


def test_duplicates_and_empty_prompts_are_dropped(tmp_path):
    records = [{"prompt": t} for t in TEXTS] + [{"prompt": TEXTS[0]}, {"prompt": f"  {TEXTS[1]}\n"},
                                                 {"prompt": ""}, {"prompt": "   "}, {"prompt": None}]
    prompts = load(write_jsonl(tmp_path / "p.jsonl", records))
    assert sorted(p.text for p in prompts) == sorted(TEXTS)


def test_same_first_turn_in_different_transcripts_is_one_prompt(tmp_path):
    records = [{"prompt": "\n\nHuman: Hi\n\nAssistant: A"}, {"prompt": "\n\nHuman: Hi\n\nAssistant: B"}]
    assert [p.text for p in load(write_jsonl(tmp_path / "p.jsonl", records))] == ["Hi"]


# ---------------------------------------------------------------------------------------------
# Order, limit and ids


def many(n: int = 40) -> list[str]:
    return [f"Prompt number {i}: what about {i * 7 % 13}?" for i in range(n)]


def test_seeded_shuffle_is_deterministic_and_independent_of_file_order(tmp_path):
    forward = write_jsonl(tmp_path / "a.jsonl", [{"prompt": t} for t in many()])
    backward = write_jsonl(tmp_path / "b.jsonl", [{"prompt": t} for t in reversed(many())])
    first = load(forward, seed=3)
    assert load(forward, seed=3) == first
    assert load(backward, seed=3) == first
    assert load(forward, seed=4) != first  # another seed, another order
    assert [p.text for p in first] != many()  # and it really is shuffled


def test_limit_takes_a_prefix_of_the_shuffled_order(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": t} for t in many()])
    everything = load(path, seed=1)
    five = load(path, seed=1, limit=5)
    assert five == everything[:5]
    # raising the limit adds prompts and keeps those already there (resume relies on this)
    assert load(path, seed=1, limit=10)[:5] == five
    assert len(load(path, seed=1, limit=1000)) == len(everything) == 40


def test_ids_are_stable_across_limits_files_and_formats(tmp_path):
    jsonl = load(write_jsonl(tmp_path / "p.jsonl", [{"prompt": t} for t in many()]), seed=0)
    json_path = tmp_path / "p.json"
    json_path.write_text(json.dumps([{"prompt": t} for t in reversed(many())]))
    ids = {p.text: p.id for p in jsonl}
    for prompt in load(json_path, seed=9, limit=7):
        assert ids[prompt.text] == prompt.id
    assert len(set(ids.values())) == len(ids)  # distinct prompts, distinct ids


# ---------------------------------------------------------------------------------------------
# Errors


def test_missing_file(tmp_path):
    message = error_of(PromptSource(path=str(tmp_path / "absent.jsonl")), what="data.helpful")
    assert "data.helpful.path" in message and "not found" in message and "absent.jsonl" in message


def test_unknown_extension(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("hello\n")
    message = error_of(PromptSource(path=str(path)))
    assert "'.txt'" in message and ".jsonl" in message and ".parquet" in message


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b",}\n')
    assert f"{path}:3" in error_of(PromptSource(path=str(path)))


def test_malformed_json_names_the_line(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('[\n  {"prompt": "a"},\n  {"prompt": }\n]\n')
    message = error_of(PromptSource(path=str(path)))
    assert f"{path}:3" in message and "not valid JSON" in message


def test_missing_field_names_fields_present_and_the_key_to_set(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "q", "answer": "a"}])
    message = error_of(PromptSource(path=str(path)))
    assert f"{path}:1" in message and "'prompt'" in message
    assert "question" in message and "answer" in message
    assert "data.red_team.field" in message


def test_missing_field_in_csv_names_the_row(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("question\nhello\n")
    message = error_of(PromptSource(path=str(path)))
    assert f"{path}:2" in message and "question" in message


def test_field_of_the_wrong_kind(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": {"text": "nested"}}])
    message = error_of(PromptSource(path=str(path)))
    assert f"{path}:1" in message and "'prompt'" in message


def test_empty_prompt_set(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": ""}, {"prompt": "  "}])
    message = error_of(PromptSource(path=str(path)))
    assert "no prompts" in message and str(path) in message


def test_empty_file(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("")
    assert "no prompts" in error_of(PromptSource(path=str(path)))


def test_unreadable_parquet(tmp_path):
    path = tmp_path / "p.parquet"
    path.write_text("this is not parquet")
    assert "cannot read Parquet" in error_of(PromptSource(path=str(path)))


def test_directory_given_as_path_says_so_and_points_to_dataset(tmp_path):
    message = error_of(PromptSource(path=str(tmp_path)))
    assert str(tmp_path) in message and "is a directory" in message and "not found" not in message
    assert "data.red_team.dataset" in message


def test_relative_path_not_found_names_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = error_of(PromptSource(path="prompts/absent.jsonl"))
    assert "not found" in message and "relative to the current directory" in message
    assert str(tmp_path) in message


def test_absolute_path_not_found_says_nothing_about_the_current_directory(tmp_path):
    message = error_of(PromptSource(path=str(tmp_path / "absent.jsonl")))
    assert "not found" in message and "current directory" not in message


@pytest.mark.parametrize(("name", "content"), [
    ("p.csv", b"prompt\nHello\nCaf\xe9 au lait\n"),  # Latin-1 e-acute on the third line
    ("p.json", b'[\n  "Hello",\n  "Caf\xe9"\n]\n'),
])
def test_non_utf8_byte_names_file_line_and_offset(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    offset = content.index(b"\xe9")
    message = error_of(PromptSource(path=str(path)))
    assert message.startswith(f"{path}:3: not UTF-8")
    assert f"0xe9 at byte offset {offset}" in message and "save" in message


def test_csv_cell_too_long_for_the_csv_module_names_the_row(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt\nshort\n" + "x" * 200_000 + "\nlater\n")
    message = error_of(PromptSource(path=str(path)))
    assert message.startswith(f"{path}:3:") and "JSONL" in message


def test_empty_json_file_has_no_records(tmp_path):
    path = tmp_path / "p.json"
    path.write_text("\n")
    message = error_of(PromptSource(path=str(path)))
    assert "no prompts" in message and "no records" in message and str(path) in message


@pytest.mark.parametrize(("content", "found"), [
    ('"just a string"', "a string"), ("42", "a number"), ("null", "null"), ("true", "true"),
    ('{"a": [1], "b": [2]}', "an object holding 2 lists"),
    ('{"a": 1}', "an object holding 0 lists"),
])
def test_json_top_level_that_is_not_a_list_says_what_was_found(tmp_path, content, found):
    path = tmp_path / "p.json"
    path.write_text(content)
    message = error_of(PromptSource(path=str(path)))
    assert message.startswith(f"{path}: expected a JSON list")
    assert message.endswith(f"found {found}")


def test_json_list_of_plain_strings_is_read_as_the_configured_field(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(TEXTS))
    assert texts(load(path, field="question")) == set(TEXTS)


def test_chat_message_with_content_that_is_not_text(tmp_path):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, {"prompt": parts}])
    message = error_of(PromptSource(path=str(path)))
    assert message.startswith(f"{path}:2: field 'prompt'") and "text user message" in message


def test_chat_message_with_null_content_counts_as_empty(tmp_path):
    records = [{"prompt": "ok"}, {"prompt": [{"role": "user", "content": None}]}]
    assert [p.text for p in load(write_jsonl(tmp_path / "p.jsonl", records))] == ["ok"]
