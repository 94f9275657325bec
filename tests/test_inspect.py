"""``cai inspect``: what a user sees for chains and pairs, filters, errors, and a fast start.

Fixtures are small hand-written chains.jsonl / pairs.jsonl files whose numbers can be checked by
hand (see the comments next to each). Output is piped, so it is plain text without colour.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cai_cli.cli import app
from cai_cli.errors import UserError

LOCKSMITH = "I can't help with getting into someone else's home. A licensed locksmith can help."


def round_(principle: str, critique: str, revision: str) -> dict:
    return {"principle": principle, "critique_request": f"Critique against {principle}.",
            "critique": critique, "revision_request": f"Revise for {principle}.",
            "revision": revision}


# 3 chains, 4 rounds. Principles: illegal-acts 2, over-refusal 1, harassment 1.
# Revisions that changed the text: c1 round 1 yes, c1 round 2 no (same as round 1),
# c2 yes, c3 no (same as initial) -> 2 of 4. Finals differing from initial: c1, c2 -> 2 of 3.
CHAINS = [
    {"id": "c1", "prompt": "How do I pick the lock on my neighbour's door?",
     "initial": "Use a tension wrench and a pick.",
     "rounds": [round_("illegal-acts", "This explains a burglary.", LOCKSMITH),
                round_("over-refusal", "The reply is fine as it is.", LOCKSMITH)],
     "final": LOCKSMITH, "extra_key": "ignored"},
    {"id": "c2", "prompt": "Write an insult about my coworker Dave.",
     "initial": "Dave is a lazy idiot.",
     "rounds": [round_("harassment", "It insults a named person.",
                       "Dave sounds frustrating to work with.")],
     "final": "Dave sounds frustrating to work with."},
    {"id": "c3", "prompt": "What is the boiling point of water?",
     "initial": "100 degrees Celsius at sea level.",
     "rounds": [round_("illegal-acts", "Nothing illegal here.",
                       "100 degrees Celsius at sea level.")],
     "final": "100 degrees Celsius at sea level."},
]


def msgs(role: str, text: str) -> list[dict]:
    return [{"role": role, "content": text}]


def pair(pid: str, prompt: str, chosen: str, rejected: str, p: float, judgments: list,
         **extra) -> dict:
    return {"id": pid, "prompt": msgs("user", prompt), "chosen": msgs("assistant", chosen),
            "rejected": msgs("assistant", rejected), "p_chosen": p, "judgments": judgments,
            **extra}


def judge(principle: str, order: str, p_first: float, **extra) -> dict:
    return {"principle": principle, "order": order, "p_first": p_first, **extra}


# Mean confidence |p_chosen - 0.5| = (0.4 + 0.1 + 0.2 + 0.3) / 4 = 0.25.
# Orders: p1 AB 0.8 vs 1-0.3=0.7 agree; p2 AB 0.7 vs 1-0.6=0.4 disagree; p3 agrees by its
# judgments but its order_disagreement key says True, and the key wins; p4 has only AB, so it
# does not count -> 2 of 3 pairs judged in both orders. Judgments: illegal-acts 4, honesty 3.
PAIRS = [
    pair("p1", "How do I pick a lock?", "A locksmith can help if you are locked out.",
         "Push the pins up with a pick.", 0.9,
         [judge("illegal-acts", "AB", 0.8, reasoning="The second answer explains a break-in."),
          judge("illegal-acts", "BA", 0.3)]),
    pair("p2", "Insult Dave.", "Dave seems frustrating.", "Dave is an idiot.", 0.6,
         [judge("illegal-acts", "AB", 0.7), judge("illegal-acts", "BA", 0.6)]),
    pair("p3", "Boiling point?", "100 C.", "50 C.", 0.7,
         [judge("honesty", "AB", 0.7), judge("honesty", "BA", 0.3)], order_disagreement=True),
    pair("p4", "Hi", "Hello!", "Go away.", 0.8, [judge("honesty", "AB", 0.8)]),
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    write_jsonl(tmp_path / "run" / "sl" / "chains.jsonl", CHAINS)
    write_jsonl(tmp_path / "run" / "prefs" / "pairs.jsonl", PAIRS)
    return tmp_path / "run"


def inspect(*args) -> str:
    result = CliRunner().invoke(app, ["inspect", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.output


def inspect_error(*args) -> str:
    result = CliRunner().invoke(app, ["inspect", *map(str, args)])
    assert isinstance(result.exception, UserError), result.output
    return str(result.exception)


def cai(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cai_cli", *map(str, args)], check=False,
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "100"},
                          timeout=60)


def squash(text: str) -> str:
    """Whitespace-insensitive view of output, for texts that wrap across lines."""
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------
# Chains


def test_chain_summary_counts_principles_and_changes(run_dir):
    out = squash(inspect(run_dir / "sl" / "chains.jsonl"))
    assert "3 chains" in out
    assert "critique/revision rounds 4 (1.3 per chain)" in out
    assert "revisions that changed the text 2 of 4 (50%)" in out
    assert "finals that differ from initial 2 of 3 (67%)" in out
    # Principles sorted by count, ties alphabetical.
    assert "illegal-acts 2 50% harassment 1 25% over-refusal 1 25%" in out
    # The record list: position, id, principles in round order, prompt.
    assert "0 c1 illegal-acts, over-refusal How do I pick the lock" in out
    assert "2 c3 illegal-acts What is the boiling point of water?" in out


def test_run_dir_shows_chains_then_pairs(run_dir):
    out = inspect(run_dir)
    assert out.index("chains.jsonl — 3 chains") < out.index("pairs.jsonl — 4 pairs")


def test_chain_view_reads_as_a_conversation_with_a_word_diff(run_dir):
    out = inspect(run_dir / "sl" / "chains.jsonl", "--id", "c1")
    flat = squash(out)
    assert "How do I pick the lock on my neighbour's door?" in flat
    assert "Round 1 — principle illegal-acts" in out
    assert "Round 2 — principle over-refusal" in out
    assert "This explains a burglary." in flat
    assert "Critique against over-refusal." in flat
    assert "Revision (unchanged" in out  # round 2 repeated round 1
    # Piped: edits are marked in the text, not by colour.
    assert f"[-Use a tension wrench and a pick.-] {{+{LOCKSMITH}+}}" in flat


def test_chain_view_by_index_and_partial_diff(run_dir):
    out = squash(inspect(run_dir / "sl" / "chains.jsonl", "--index", "1"))
    assert "chain c2" in out
    # The unchanged words stay bare; only the edits are marked.
    assert "[-Dave is a lazy idiot.-] {+Dave sounds frustrating to work with.+}" in out \
        or "Dave [-is a lazy idiot.-] {+sounds frustrating to work with.+}" in out


def test_long_texts_wrap_instead_of_being_cut(tmp_path):
    long_answer = " ".join(f"word{i}" for i in range(300))
    chain = dict(CHAINS[2], initial=long_answer)
    path = write_jsonl(tmp_path / "chains.jsonl", [chain])
    out = inspect(path, "--index", "0")
    assert "word0 " in out and "word299" in out
    # Wrapped at the width (120 when piped); only the file path is left to the terminal.
    assert all(len(line) <= 120 for line in out.splitlines() if str(path) not in line)
    assert not any(line.endswith(" ") for line in out.splitlines())  # no padding to the width


def test_filters_principle_grep_and_limit(run_dir):
    chains = run_dir / "sl" / "chains.jsonl"
    out = squash(inspect(chains, "--principle", "harassment"))
    assert "1 of 3 chains match" in out and "0 c2 harassment" in out and "c1" not in out

    out = squash(inspect(chains, "--grep", "BURGLARY"))  # case-insensitive, in a critique
    assert "1 of 3 chains match" in out and "0 c1" in out

    out = squash(inspect(chains, "--limit", "1"))
    assert "0 c1" in out and "1 c2" not in out and "showing 1 of 3" in out

    # --index counts within the filtered records.
    out = inspect(chains, "--principle", "illegal-acts", "--index", "1")
    assert "chain c3" in out


def test_filter_that_matches_nothing_says_so(run_dir):
    out = squash(inspect(run_dir, "--principle", "no-such-principle"))
    assert "no chains match --principle no-such-principle (3 in the file)" in out
    assert "principles used there: harassment, illegal-acts, over-refusal" in out
    assert "no pairs match" in out


def test_unfinished_chains_are_shown_with_a_note(tmp_path):
    partial = tmp_path / "run" / "sl" / "chains.jsonl.partial"
    write_jsonl(partial, CHAINS[:2])
    with partial.open("a") as handle:
        handle.write(json.dumps(CHAINS[2])[:40])  # a killed writer's torn last line
    out = squash(inspect(tmp_path / "run"))
    assert "chains.jsonl.partial — 2 chains" in out
    assert "unfinished" in out and "cai generate-sl" in out


# ---------------------------------------------------------------------------------------------
# Pairs


def test_pairs_summary(run_dir):
    out = squash(inspect(run_dir / "prefs" / "pairs.jsonl"))
    assert "4 pairs" in out
    assert "mean confidence |p_chosen-0.5| 0.25" in out
    assert "orders disagree 2 of 3 pairs judged in both orders (67%)" in out
    assert "illegal-acts 4 57% honesty 3 43%" in out
    assert "0 p1 0.90 illegal-acts How do I pick a lock?" in out


def test_pair_view_shows_both_answers_and_every_judgment(run_dir):
    out = inspect(run_dir / "prefs" / "pairs.jsonl", "--id", "p1")
    flat = squash(out)
    assert "How do I pick a lock?" in flat
    assert "chosen (p=0.90)" in out and "rejected" in out
    assert "A locksmith can help" in out and "Push the pins up with a pick." in out
    assert "illegal-acts AB 0.80 The second answer explains a break-in." in flat
    assert "illegal-acts BA 0.30" in flat


def test_pair_view_names_principles_whose_orders_disagree(run_dir):
    out = squash(inspect(run_dir / "prefs" / "pairs.jsonl", "--id", "p2"))
    assert "orders disagree (position bias) for: illegal-acts" in out


def test_kind_comes_from_the_keys_not_the_file_name(tmp_path):
    path = write_jsonl(tmp_path / "whatever.jsonl", PAIRS)
    assert "4 pairs" in inspect(path)


# ---------------------------------------------------------------------------------------------
# Errors: exit 2, one line naming what is wrong, no traceback


def test_unknown_id_names_what_exists(run_dir):
    message = inspect_error(run_dir / "sl" / "chains.jsonl", "--id", "nope")
    assert "'nope'" in message and "chains.jsonl (3 records)" in message and "c1" in message


def test_index_out_of_range(run_dir):
    message = inspect_error(run_dir / "prefs" / "pairs.jsonl", "--index", "4")
    assert "--index 4" in message and "(4 records)" in message


def test_missing_path_and_empty_run_dir(tmp_path):
    assert "nowhere" in inspect_error(tmp_path / "nowhere")
    message = inspect_error(tmp_path)
    assert "cai generate-sl --config" in message and "cai label-prefs --config" in message


def test_record_of_neither_kind(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"id": "x", "messages": []}])
    assert "neither a chain" in inspect_error(path)


def test_record_missing_keys_names_them(tmp_path):
    broken = dict(CHAINS[0], rounds=[{"principle": "illegal-acts"}])
    message = inspect_error(write_jsonl(tmp_path / "chains.jsonl", [CHAINS[1], broken]))
    assert "record 2" in message and "rounds[0].critique: Field required" in message
    assert "rounds[0].revision: Field required" in message


def test_bad_id_exits_2_without_traceback(run_dir):
    result = cai("inspect", run_dir, "--id", "nope")
    assert result.returncode == 2
    assert "error: no record with id 'nope'" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_malformed_line_exits_2_naming_file_and_line(tmp_path):
    path = tmp_path / "chains.jsonl"
    path.write_text(json.dumps(CHAINS[0]) + "\n{not json\n")
    result = cai("inspect", path)
    assert result.returncode == 2
    assert f"{path}:2:" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------
# As a real command


def test_cli_subprocess_summary_and_chain(run_dir):
    result = cai("inspect", run_dir)
    assert result.returncode == 0, result.stderr
    assert "3 chains" in result.stdout and "4 pairs" in result.stdout
    assert "\x1b[" not in result.stdout  # piped: no colour codes

    result = cai("inspect", run_dir / "sl" / "chains.jsonl", "--index", "0")
    assert result.returncode == 0, result.stderr
    assert "Round 1 — principle illegal-acts" in result.stdout
    assert "[-" in result.stdout and "{+" in result.stdout


def test_diff_on_a_terminal_uses_colour_not_markers(run_dir):
    result = subprocess.run(
        [sys.executable, "-m", "cai_cli", "inspect", str(run_dir / "sl" / "chains.jsonl"),
         "--id", "c2"], check=False, capture_output=True, text=True, timeout=60,
        env={**{k: v for k, v in os.environ.items() if k != "NO_COLOR"},
             "FORCE_COLOR": "1", "TERM": "xterm-256color"})
    assert result.returncode == 0, result.stderr
    diff = result.stdout.split("Initial → final")[1]
    assert "\x1b[" in diff and "[-" not in diff and "{+" not in diff


def test_inspect_does_not_import_heavy_libraries():
    code = ("import sys, cai_cli.cli, cai_cli.commands.inspect; "
            "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'trl') "
            "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_control_bytes_are_shown_as_replacement_characters_in_a_pipe_and_a_terminal(tmp_path):
    """A random model writes any byte: NUL, ESC (a colour or cursor sequence), a bell. Neither a
    pipe nor a terminal gets them, as in `cai report`; line breaks stay line breaks."""
    hostile = {**CHAINS[1], "id": "c\x002", "prompt": "Say \x1b[31mred\x1b[0m\x07 now\r\nplease",
               "initial": "nul\x00here", "rounds": [round_("harass\x1bment", "bad\x00", "ok")]}
    path = write_jsonl(tmp_path / "chains.jsonl", [hostile])
    terminal = {**{k: v for k, v in os.environ.items() if k != "NO_COLOR"},
                "FORCE_COLOR": "1", "TERM": "xterm-256color"}
    for env in (None, terminal):
        for args in ([path], [path, "--index", "0"]):
            result = subprocess.run([sys.executable, "-m", "cai_cli", "inspect", *map(str, args)],
                                    check=False, capture_output=True, timeout=60, env=env)
            assert result.returncode == 0, result.stderr
            out = result.stdout.decode()
            assert "\x00" not in out and "\x07" not in out and "\x1b[31m" not in out
            assert "\ufffd[31mred\ufffd[0m\ufffd now" in out
            if env is None:
                assert "\x1b" not in out
    shown = inspect(path, "--id", "c\x002")  # the id as the summary shows it finds it too
    assert "chain c\ufffd2" in shown and "Say \ufffd[31mred" in shown and "now\n  please" in shown
