"""Input data: local JSONL / JSON / CSV / Parquet files or a dataset id, and what they hold.

Prompts end up as a list of ``Prompt(id, text)``: de-duplicated, shuffled with the seed and
capped by ``limit``. Ids are content hashes, so the same prompt keeps its id across runs, limits
and orderings (resume and the per-prompt principle draws rely on that). Conversations (SFT data,
preference pairs) are chat messages checked by ``chat_messages``; Anthropic HH transcripts are
read by ``transcript_messages`` (in ``cai_cli.data.transcripts``).

A file the user names is checked here before it is read (``file_problem``, ``read_text``), so a
missing file, a directory or a byte that is not UTF-8 is a one-line error naming the place.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from cai_cli.config import PromptSource
from cai_cli.data.transcripts import first_human_turn
from cai_cli.data.transcripts import (
    transcript_messages as transcript_messages,  # stages import it here
)
from cai_cli.errors import UserError, reason
from cai_cli.reading import file_problem, read_text
from cai_cli.run.artifacts import iter_jsonl

FILE_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}

Conversation = list[dict[str, str]]
# The roles every chat template renders; another ("narrator", "bot", a typo) would be rendered
# as the template pleases (or as a turn of the user's) and trained on.
CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str


def prompt_id(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def chat_messages(value: Any, where: str, role: str | None = None, *, answered: bool = False,
                  fix: str = "") -> Conversation:
    """Chat messages reduced to role and content, each of a role in ``CHAT_ROLES``. With
    ``role`` a string becomes one message of that role; ``answered``: at least one must be the
    assistant's (something to learn from).
    ``where`` names the file and line in errors, ``fix`` is added to them."""
    if isinstance(value, str) and role is not None:
        return [{"role": role, "content": value}]
    fix = f"; {fix}" if fix else ""
    if not isinstance(value, list) or not value or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in value):
        raise UserError(f"{where}: expected a non-empty list of chat messages "
                        f"({{'role', 'content'}}){fix}")
    for number, message in enumerate(value, start=1):
        if message["role"] not in CHAT_ROLES:
            raise UserError(f"{where}: message {number} has the role {message['role']!r}, which "
                            f"is not a chat role ({', '.join(CHAT_ROLES)}); rename it or leave "
                            f"the record out{fix}")
    if answered and not any(m["role"] == "assistant" for m in value):
        raise UserError(f"{where}: the conversation has no assistant message to learn from{fix}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def to_prompt_text(value: Any) -> str | None:
    """A prompt from a cell: a string (maybe a transcript) or a list of chat messages whose
    first user message is text (missing or null content counts as empty)."""
    if isinstance(value, str):
        return first_human_turn(value)
    if isinstance(value, list):
        for message in value:
            if isinstance(message, dict) and message.get("role") == "user":
                content = message.get("content") or ""
                return content.strip() if isinstance(content, str) else None
    return None


def read_records(source: PromptSource, what: str) -> Iterable[tuple[str, dict]]:
    """Yield ``(where, record)`` pairs from a prompt source; ``where`` names file and line."""
    if source.path is not None:
        path = Path(source.path).expanduser()
        problem = file_problem(path)
        if problem is not None and path.is_dir():  # maybe a dataset saved as files
            raise UserError(f"{what}.path: {path}: {problem}; to read a dataset directory give "
                            f"it as {what}.dataset")
        if problem is not None:
            raise UserError(f"{what}.path: {path}: {problem}")
        kind = FILE_FORMATS.get(path.suffix.lower())
        if kind is None:
            raise UserError(f"{what}.path: {path}: unknown file type '{path.suffix}'; use one of "
                            f"{', '.join(FILE_FORMATS)}, or a dataset id under {what}.dataset")
        yield from _read_file(path, kind, source.field)
    else:
        yield from _read_dataset(source, what)


def _read_file(path: Path, kind: str, field: str) -> Iterable[tuple[str, dict]]:
    """Records of one file; a JSON list of plain values is read as the values of ``field``."""
    if kind == "jsonl":
        for number, record in enumerate(iter_jsonl(path), start=1):
            yield f"{path}:{number}", record
    elif kind == "json":
        text = read_text(path)
        if not text.strip():
            return  # no records, like an empty JSONL or CSV file
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}: the one list inside
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(lists) == 1 else data
        if not isinstance(data, list):
            found = (f"an object holding {len(lists)} lists" if isinstance(data, dict)
                     else json.dumps(data) if data is None or isinstance(data, bool)
                     else f"a {'string' if isinstance(data, str) else 'number'}")
            raise UserError(f"{path}: expected a JSON list of records (or an object holding one "
                            f"list), found {found}")
        for number, record in enumerate(data):
            yield f"{path}[{number}]", record if isinstance(record, dict) else {field: record}
    elif kind == "csv":
        # Spreadsheet exports start with a byte-order mark that would otherwise become part of
        # the first column's name.
        text = read_text(path, newline="").removeprefix("\ufeff")
        rows = csv.DictReader(io.StringIO(text, newline=""))
        number = 1  # the header; records are numbered as rows of the sheet, from 2
        try:
            for number, record in enumerate(rows, start=2):
                yield f"{path}:{number}", record
        except csv.Error as exc:  # a cell longer than the csv module's limit (128 KiB)
            raise UserError(f"{path}:{number + 1}: cannot read this CSV row ({exc}); a JSONL "
                            "file has no such limit") from None
    else:
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise UserError(f"{path}: cannot read Parquet file ({exc})") from None
        for number, record in enumerate(table.to_pylist()):
            yield f"{path} row {number}", record


def _read_dataset(source: PromptSource, what: str) -> Iterable[tuple[str, dict]]:
    import datasets

    if Path(source.dataset).expanduser().is_file():
        # load_dataset would take a file name for a hub id and fail with a network error.
        raise UserError(f"{what}.dataset: '{source.dataset}' is a file, not a dataset; give it as "
                        f"{what}.path instead (and remove {what}.dataset)")
    try:
        dataset = datasets.load_dataset(source.dataset, split=source.split, data_dir=source.data_dir)
    except Exception as exc:  # hub, network and layout errors all mean: cannot read this source
        raise UserError(f"{what}.dataset: cannot load '{source.dataset}' (split '{source.split}'): "
                        f"{reason(exc)}") from None
    for number, record in enumerate(dataset):
        yield f"{source.dataset}[{source.split}] row {number}", record


def load_prompts(source: PromptSource, seed: int, what: str = "data.red_team") -> list[Prompt]:
    """Read, reduce to text, de-duplicate, shuffle with ``seed`` and apply ``limit``."""
    seen: dict[str, Prompt] = {}
    records = 0
    for where, record in read_records(source, what):
        records += 1
        if source.field not in record:
            fields = ", ".join(map(str, record)) or "none"
            raise UserError(f"{where}: no field '{source.field}' (fields: {fields}); "
                            f"set {what}.field to the column that holds the prompt")
        value = record[source.field]
        if value is None:  # a missing cell (null in JSON, empty in Parquet) counts as empty
            continue
        text = to_prompt_text(value)
        if text is None:
            raise UserError(f"{where}: field '{source.field}' is neither text nor a list of chat "
                            "messages with a text user message")
        if text and text not in seen:
            seen[text] = Prompt(prompt_id(text), text)
    if not seen:
        origin = source.path or source.dataset
        why = f"every '{source.field}' value was empty" if records else "it holds no records"
        raise UserError(f"{what}: no prompts in {origin} ({why})")
    prompts = sorted(seen.values(), key=lambda p: p.id)  # independent of file order before shuffle
    random.Random(seed).shuffle(prompts)
    return prompts[: source.limit] if source.limit else prompts


def preference_pair(record: dict, where: str) -> dict | None:
    """A preference record in TRL's layouts (explicit ``prompt``, or an implicit one: whole
    conversations or Human:/Assistant: transcripts) as a conversational pair with label
    ``p_chosen`` 1.0; ``None`` when the two conversations do not differ."""
    if "chosen" not in record or "rejected" not in record:
        raise UserError(f"{where}: expected 'chosen' and 'rejected' fields (TRL's preference "
                        f"format); the record has {', '.join(map(str, record)) or 'none'}")
    chosen, rejected = record["chosen"], record["rejected"]
    if record.get("prompt") is not None:
        prompt = record["prompt"]
        return {"prompt": chat_messages(prompt, f"{where}: prompt", role="user"),
                "chosen": chat_messages(chosen, f"{where}: chosen", role="assistant"),
                "rejected": chat_messages(rejected, f"{where}: rejected", role="assistant"),
                "p_chosen": 1.0}
    # Implicit prompt: whole conversations (or Human:/Assistant: transcripts); what they share
    # at the start is the prompt.
    sides = []
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        conversation = transcript_messages(value) if isinstance(value, str) else value
        if conversation is None:
            raise UserError(f"{where}: '{name}' is plain text without a prompt field; give a "
                            "'prompt' column or Human:/Assistant: transcripts")
        sides.append(chat_messages(conversation, f"{where}: {name}"))
    shared = 0
    while shared < min(map(len, sides)) and sides[0][shared] == sides[1][shared]:
        shared += 1
    if shared == 0:
        raise UserError(f"{where}: 'chosen' and 'rejected' start differently, so there is no "
                        "shared prompt; give a 'prompt' column")
    if shared == len(sides[0]) or shared == len(sides[1]):
        return None
    return {"prompt": sides[0][:shared], "chosen": sides[0][shared:],
            "rejected": sides[1][shared:], "p_chosen": 1.0}
