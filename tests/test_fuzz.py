"""The fuzz tier: whatever a user's files hold, the real command exits 0, or 2 with one message;
never a traceback, never a changed run directory.

Property-based (hypothesis) over the three places user bytes come in:

- the config loader (``cai config show`` or ``validate --config F --set ...``): structured
  mutations of a valid config (any key, including misspelt ones, set to any YAML value),
  textual hazards (aliases, duplicate keys, tabs, byte-order marks, bytes that are not UTF-8,
  NUL characters, cut-off files) and raw junk;
- the record readers (``cai inspect`` of a run directory or a file): chains, pairs and
  generated prompts, valid or with any key changed, lines of other JSON, torn lines, junk, as
  finished files or as a stage's ``.partial``; and ``records.read`` of every record kind;
- the prompt readers (``cai config validate`` reading ``data.red_team`` and ``data.helpful``):
  JSONL, JSON and CSV files of any shape.

Each property runs the command in this process (``helpers.cai_main``: ``cai_cli.cli.main`` as
the ``cai`` script runs it, so exit codes are the real ones), derandomised (the same examples
on every run, in CI too), without a database; the example counts keep the tier well under a
minute.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cai_cli.config import field_reference  # noqa: E402
from fake_run import chain, pair  # noqa: E402
from helpers import cai_main, snapshot  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONSTITUTION = ROOT / "constitutions" / "harmless.yaml"
PROMPTS = ROOT / "cai_cli" / "resources" / "red_team_prompts.jsonl"

pytestmark = pytest.mark.fuzz


def fuzz(examples: int):
    return settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                    print_blob=False, suppress_health_check=list(HealthCheck))


# ---------------------------------------------------------------------------------------------
# What any input may do


def assert_contract(result, run_dir: Path, before) -> None:
    """Exit 0, or 2 with one message; no traceback; the run directory as it was."""
    hypothesis.event(f"exit {result.returncode}")  # pytest --hypothesis-show-statistics
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode in (0, 2), (result.returncode, result.stderr[-3000:])
    if result.returncode == 2:
        # ours ("error: ..."), or the command line's own usage error ("Error: ...")
        errors = [line for line in result.stderr.splitlines()
                  if line.startswith(("error:", "Error:"))]
        assert len(errors) == 1, result.stderr[-3000:]
    assert snapshot(run_dir) == before


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run directory the commands must leave alone: a finished generate-sl's files."""
    run = tmp_path_factory.mktemp("fuzz") / "run"
    (run / ".cai").mkdir(parents=True)
    (run / "sl").mkdir()
    (run / "sl" / "chains.jsonl").write_text("".join(json.dumps(chain(i)) + "\n" for i in range(2)))
    return run


# Any JSON value, small.
scalars = (st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
junk_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=200)
# Values a config key often takes, so that many configs are valid.
plausible = st.integers(0, 4) | st.floats(0, 1) | st.booleans() | st.none() | st.text(max_size=8)
# Characters that mean something to YAML, JSON, CSV or a shell.
syntax = st.text(alphabet=string.printable + "&*!|>%@`\u00a0\ufeff\x00", max_size=60)


# ---------------------------------------------------------------------------------------------
# The config loader

KEYS = [key for key, _, _ in field_reference()]
VALID = {"constitution": str(CONSTITUTION), "data": {"red_team": {"path": str(PROMPTS)}},
         "models": {"policy": {"name_or_path": "some/model"}}}


def set_path(data: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = data
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[last] = value


HAZARDS = ["none", "alias", "bomb", "duplicate", "tab", "bom", "latin1", "cut", "nul", "deep",
           "nul_path"]
PATH_KEYS = ["run_dir", "constitution", "data.red_team.path", "models.policy.name_or_path",
             "finetune.model", "label_prefs.policy", "evaluate.benign.path"]


@st.composite
def config_files(draw, run_dir: Path) -> bytes:
    if draw(st.integers(0, 9)) == 0:  # raw junk now and then
        return draw(st.binary(max_size=300) | junk_text.map(str.encode))
    data = json.loads(json.dumps({**VALID, "run_dir": str(run_dir)}))
    for key, value in draw(st.just([]) | st.lists(st.tuples(
            st.sampled_from(KEYS) | syntax.filter(bool), plausible | json_values), max_size=3)):
        set_path(data, key, value)
    hazard = draw(st.just("none") | st.just("none") | st.sampled_from(HAZARDS))
    if hazard == "nul_path":  # a path YAML can hold ("a\0b") and the file system cannot
        set_path(data, draw(st.sampled_from(PATH_KEYS)), "runs/a\x00b")
    text = yaml.safe_dump(data, allow_unicode=True)
    if hazard == "alias":
        text += "finetune:\n  training:\n    trl_args: {a: &x [1, 2], b: *x, c: *x}\n"
    elif hazard == "bomb":
        text += "evaluate:\n  models: &l0 [a, a, a, a, a, a, a, a, a, a]\n" + "".join(
            f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n" for i in range(1, 7))
    elif hazard == "duplicate":
        text += f"{draw(st.sampled_from(['seed', 'run_dir', 'data']))}: 1\n"
    elif hazard == "tab":
        text = text.replace("  ", "\t", 1)
    elif hazard == "bom":
        text = "\ufeff" + text
    elif hazard == "cut":
        text = text[:draw(st.integers(0, len(text)))]
    elif hazard == "nul":
        text = text.replace(":", ":\x00", 1)
    elif hazard == "deep":
        depth = draw(st.integers(50, 3000))
        text += "finetune:\n  training:\n    trl_args: {x: " + "[" * depth + "]" * depth + "}\n"
    raw = text.encode("utf-8")
    if hazard == "latin1":
        raw = raw.replace(b"a", b"\xe9", 1)
    return raw


overrides = st.just([]) | st.lists(st.tuples(st.sampled_from(KEYS) | syntax, syntax | json_values.map(json.dumps))
                     .map(lambda kv: f"{kv[0]}={kv[1]}") | syntax, max_size=2)


def test_any_config_loads_or_is_one_message(run_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("configs")
    before = snapshot(run_dir)

    @fuzz(200)
    @given(config_files(run_dir), overrides, st.sampled_from(["show", "show", "show", "validate"]))
    def check(raw: bytes, sets: list[str], command: str):
        path = folder / "config.yaml"
        path.write_bytes(raw)
        args = ["config", command, "--config", path]
        for value in sets:
            args += ["--set", value]
        assert_contract(cai_main(*args), run_dir, before)

    check()


# ---------------------------------------------------------------------------------------------
# The record readers


def mutated(record: dict, draw) -> dict:
    record = json.loads(json.dumps(record))
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.sampled_from(sorted(record)) | st.text(max_size=6))
        if draw(st.booleans()):
            record.pop(key, None)
        else:
            record[key] = draw(json_values)
    return record


@st.composite
def jsonl_files(draw, valid) -> bytes:
    lines = []
    for number in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["valid", "mutated", "json", "junk", "blank"]))
        if kind == "valid":
            lines.append(json.dumps(valid(number)))
        elif kind == "mutated":
            lines.append(json.dumps(mutated(valid(number), draw), allow_nan=True))
        elif kind == "json":
            lines.append(json.dumps(draw(json_values), allow_nan=True))
        elif kind == "junk":
            lines.append(draw(st.binary(max_size=40)).replace(b"\n", b" ").decode("latin-1"))
        else:
            lines.append("")
    raw = "\n".join(lines).encode("utf-8", "surrogateescape")
    if draw(st.booleans()):
        raw += b"\n"
    elif raw and draw(st.booleans()):
        raw = raw[:draw(st.integers(0, len(raw)))]  # torn by a kill
    return raw


def prompt_record(number: int) -> dict:
    return {"id": f"p{number}", "prompt": f"Prompt {number}?", "seed_ids": ["s1", "s2"]}


inspect_options = st.lists(st.sampled_from(["--id", "--index", "--principle", "--grep", "--limit"])
                           .flatmap(lambda option: st.tuples(st.just(option), syntax | st.integers(
                               -3, 5).map(str))), max_size=2, unique_by=lambda o: o[0])


def test_any_run_directory_or_artifact_inspects_or_is_one_message(tmp_path_factory):
    folder = tmp_path_factory.mktemp("records")

    @fuzz(150)
    @given(jsonl_files(chain), jsonl_files(lambda n: pair(n, 0.25 * (n % 5))),
           jsonl_files(prompt_record), st.sampled_from(["final", "partial", "absent"]),
           st.sampled_from(["run", "chains", "pairs", "prompts"]), inspect_options)
    def check(chains, pairs, prompts, state, target, options):
        run = folder / "run"
        if run.exists():
            import shutil

            shutil.rmtree(run)
        for rel, raw in (("sl/chains.jsonl", chains), ("prefs/pairs.jsonl", pairs),
                         ("prompts/red_team.jsonl", prompts)):
            if state == "absent" and rel.startswith("prefs"):
                continue
            path = run / (rel + (".partial" if state == "partial" and rel.startswith("sl") else ""))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(raw)
        shown = {"run": run, "chains": next((run / "sl").iterdir()),
                 "pairs": run / "prefs" / "pairs.jsonl",
                 "prompts": run / "prompts" / "red_team.jsonl"}[target]
        before = snapshot(run)
        args = ["inspect", shown] + [part for option in options for part in option]
        assert_contract(cai_main(*args), run, before)

    check()


@fuzz(200)
@given(st.sampled_from(["Chain", "Pair", "Sample", "SFTExample", "EvalAnswer", "Judgment"]),
       st.data())
def test_records_read_any_bytes_as_records_or_one_user_error(tmp_path_factory, kind, data):
    from cai_cli.errors import UserError
    from cai_cli.run import records

    valid = {"Chain": chain, "Pair": lambda n: pair(n, 0.5),
             "Sample": lambda n: {"id": f"s{n}", "prompt": "q", "responses": ["a", "b"]},
             "SFTExample": lambda n: {"id": f"x{n}", "prompt": [{"role": "user", "content": "q"}],
                                      "completion": [{"role": "assistant", "content": "a"}]},
             "EvalAnswer": lambda n: {"model": "base", "id": f"e{n}", "answer": "a"},
             "Judgment": lambda n: {"principle": "p", "order": "AB", "p_first": 0.5}}[kind]
    path = tmp_path_factory.getbasetemp() / f"records-{kind}.jsonl"
    path.write_bytes(data.draw(jsonl_files(valid)))
    torn = data.draw(st.booleans())
    try:
        got = records.read(path, getattr(records, kind), allow_torn_tail=torn)
    except UserError as exc:
        assert str(exc).startswith(str(path)) and "\n" not in str(exc)
    else:
        assert all(isinstance(record, getattr(records, kind)) for record in got)


# ---------------------------------------------------------------------------------------------
# The prompt readers


def messages(content) -> st.SearchStrategy:
    return st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system",
                                                                    "", "tool"]),
                                           "content": content}), max_size=3)


@st.composite
def prompt_files(draw, field: str) -> tuple[str, bytes]:
    """A prompt file of any shape; most records hold ``field`` as the readers expect it."""
    suffix = draw(st.sampled_from([".jsonl", ".json", ".csv"]))
    if draw(st.integers(0, 9)) == 0:
        return suffix, draw(st.binary(max_size=200))
    conversation = st.tuples(st.text(min_size=1, max_size=20), st.text(max_size=20)).map(
        lambda qa: [{"role": "user", "content": qa[0]}, {"role": "assistant", "content": qa[1]}])
    expected = (conversation if field == "messages"
                else st.text(min_size=1, max_size=30) | conversation)
    anything = st.text(max_size=30) | json_values | messages(st.text(max_size=20) | json_values)
    record = (st.fixed_dictionaries({field: expected}) | st.fixed_dictionaries({field: expected})
              | st.dictionaries(st.sampled_from(["prompt", "messages", "text", "", field]),
                                anything, max_size=3) | json_values)
    records = draw(st.lists(record, min_size=1, max_size=5))
    if suffix == ".jsonl":
        raw = "\n".join(json.dumps(r, allow_nan=True) for r in records)
    elif suffix == ".json":
        raw = json.dumps(draw(st.sampled_from([records, {"data": records}, records[:1], "x"])),
                         allow_nan=True)
    else:
        header = draw(st.sampled_from([field, f"{field},text", "text", f"\ufeff{field}", ""]))
        rows = [r.get(field) if isinstance(r, dict) and isinstance(r.get(field), str) else
                draw(syntax) for r in records]
        raw = header + "\n" + "\n".join(json.dumps(row) if draw(st.booleans()) else str(row)
                                        for row in rows)
    return suffix, raw.encode("utf-8", "surrogateescape")


def test_any_prompt_file_is_read_or_is_one_message(run_dir, tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("prompts")
    before = snapshot(run_dir)

    @fuzz(80)
    @given(st.sampled_from(["prompt", "messages", "text"]), st.sampled_from(["messages", "prompt"]),
           st.data(), st.none() | st.integers(1, 3))
    def check(field, helpful_field, data, limit):
        red_team = data.draw(prompt_files(field))
        helpful = data.draw(st.none() | prompt_files(helpful_field))
        red_path = folder / f"red_team{red_team[0]}"
        red_path.write_bytes(red_team[1])
        sources = {"red_team": {"path": str(red_path), "field": field, "limit": limit}}
        if helpful is not None:
            helpful_path = folder / f"helpful{helpful[0]}"
            helpful_path.write_bytes(helpful[1])
            sources["helpful"] = {"path": str(helpful_path), "field": helpful_field}
        config = {"run_dir": str(run_dir), "constitution": str(CONSTITUTION), "data": sources,
                  "models": {"policy": {"name_or_path": str(tiny_model_dir), "device": "cpu"}}}
        path = folder / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        assert_contract(cai_main("config", "validate", "--config", path), run_dir, before)

    check()
