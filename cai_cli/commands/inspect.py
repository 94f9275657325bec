"""``cai inspect``: read critique/revision chains and preference pairs in the terminal.

The user runs this to judge whether the constitution does what they meant, so the views favour
reading over counting: a summary with the numbers that reveal a broken stage (revisions that
change nothing, labels near 0.5, judges that flip with answer order), a one-line list of records,
and a full view of one record as a conversation (chains) or side by side (pairs).

Output goes to stdout through rich. When stdout is not a terminal rich drops colour and styles,
so nothing here relies on colour alone: tables use a plain box, the word diff switches to
``[-removed-]{+added+}`` markers, and long texts wrap instead of being cut.

This module must start fast: it imports no torch/transformers/datasets/trl, not even through
``cai_cli.engines`` or ``cai_cli.stages``.
"""

from __future__ import annotations

import difflib
import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

from rich import box
from rich.console import Console
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from cai_cli import ui
from cai_cli.run.artifacts import read_jsonl
from cai_cli.reports.statistics import label_diagnostics
from cai_cli.errors import UserError
from cai_cli.run.records import Chain, Pair, parse

CHAINS, PAIRS = "chains", "pairs"

# Where a run directory keeps each artifact, and the command that makes it.
RUN_DIR_FILES = {CHAINS: "sl/chains.jsonl", PAIRS: "prefs/pairs.jsonl"}
MAKER = {CHAINS: "cai generate-sl --config ...", PAIRS: "cai label-prefs --config ..."}

# Keys each record must have, the key of its list of steps, and the keys of each step. Checked up
# front so a wrong file is one clear error, not a KeyError halfway through a table.
DEFAULT_LIMIT = 20


@dataclass
class Artifact:
    """One JSONL file of chains or pairs, read whole (they are small next to a model)."""

    path: Path
    kind: str  # CHAINS or PAIRS; "" for an empty file, whose kind cannot be told
    records: list[dict]
    unfinished: bool = False  # a .partial file left by an interrupted stage


def run_inspect(path: Path, *, record_id: str | None = None, index: int | None = None,
                principle: str | None = None, grep: str | None = None,
                limit: int | None = None) -> None:
    if record_id is not None and index is not None:
        raise UserError("give --id or --index, not both")
    if limit is not None and limit < 0:
        raise UserError(f"--limit must be 0 or more, got {limit}")
    console = ui.stdout
    path = Path(path)
    record_id = None if record_id is None else ui.printable(record_id)  # ids as shown
    prompts = generated_prompts_file(path)
    if prompts is not None:
        show_generated_prompts(console, prompts, record_id, index, grep,
                               DEFAULT_LIMIT if limit is None else limit)
        if path.is_file() or not any((path / rel).is_file() or (path / f"{rel}.partial").is_file()
                                     for rel in RUN_DIR_FILES.values()):
            return
        console.print()
    artifacts = load_artifacts(path)
    if record_id is not None or index is not None:
        show_records(console, artifacts, record_id, index, principle, grep)
        return
    for number, artifact in enumerate(artifacts):
        if number:
            console.print()
        show_summary(console, artifact, principle, grep, DEFAULT_LIMIT if limit is None else limit)


# ---------------------------------------------------------------------------------------------
# Reading


def load_artifacts(path: Path) -> list[Artifact]:
    """A JSONL file, or every chains/pairs file in a run directory (chains first)."""
    if not path.exists():
        raise UserError(f"{path}: no such file or directory; pass a run directory (run_dir in "
                        "the config) or a chains.jsonl / pairs.jsonl file")
    if path.is_file():
        return [read_artifact(path, unfinished=path.name.endswith(".partial"))]
    found = []
    for rel in RUN_DIR_FILES.values():
        final = path / rel
        partial = final.with_name(final.name + ".partial")
        if final.is_file():
            found.append(read_artifact(final))
        elif partial.is_file():  # the stage was interrupted: show what it wrote so far
            found.append(read_artifact(partial, unfinished=True))
    if not found:
        raise UserError(
            f"{path}: no {RUN_DIR_FILES[CHAINS]} or {RUN_DIR_FILES[PAIRS]} here; chains are made "
            f"by `{MAKER[CHAINS]}`, pairs by `{MAKER[PAIRS]}` (or pass a JSONL file directly)")
    return found


def read_artifact(path: Path, unfinished: bool = False) -> Artifact:
    # A .partial file may end in a line cut short by the kill; that line is not an error.
    records = read_jsonl(path, allow_torn_tail=unfinished)
    kind = record_kind(path, records)
    return Artifact(path, kind, [shown(record) for record in records], unfinished)


def shown(value):
    """A record as it is shown: every string printable (``ui.printable``: control characters
    such as NUL and ESC as U+FFFD), in a terminal and in a pipe alike, so model text cannot
    move the cursor, recolour the terminal or put a NUL into what a pipe reads."""
    if isinstance(value, str):
        return ui.printable(value)
    if isinstance(value, list):
        return [shown(item) for item in value]
    if isinstance(value, dict):
        return {shown(key): shown(item) for key, item in value.items()}
    return value


def record_kind(path: Path, records: list[dict]) -> str:
    """Tell chains from pairs by their keys (files get renamed), and check every record."""
    if not records:
        return ""
    first = records[0]
    if "rounds" in first:
        kind = CHAINS
    elif "chosen" in first and "rejected" in first:
        kind = PAIRS
    else:
        raise UserError(f"{path}: record 1 is neither a chain (has \"rounds\") nor a preference "
                        "pair (has \"chosen\"/\"rejected\"); cai inspect reads "
                        f"{RUN_DIR_FILES[CHAINS]} and {RUN_DIR_FILES[PAIRS]}")
    record_type = Chain if kind == CHAINS else Pair
    for number, record in enumerate(records, start=1):
        parse(record, record_type, f"{path}: record {number}")
    return kind


# ---------------------------------------------------------------------------------------------
# Record helpers


def as_text(value) -> str:
    """A chain's prompt is a string; a pair's prompt and answers are lists of messages."""
    if isinstance(value, list):
        return "\n\n".join(as_text(message) for message in value)
    if isinstance(value, dict):
        return as_text(value.get("content", ""))
    return "" if value is None else str(value)


def words(value) -> int:
    return len(as_text(value).split())


def same_text(a, b) -> bool:
    # Whitespace-only edits (a trailing newline, re-wrapped lines) are not a real revision.
    return as_text(a).split() == as_text(b).split()


def principles_of(record: dict, kind: str) -> list[str]:
    """Principle ids in the order used, each once."""
    steps = record["rounds"] if kind == CHAINS else record["judgments"]
    return list(dict.fromkeys(str(step["principle"]) for step in steps))


def texts_of(record: dict, kind: str) -> list[str]:
    """Every text a user might search for (not ids, roles or numbers)."""
    if kind == CHAINS:
        texts = [record["prompt"], record["initial"], record["final"]]
        for r in record["rounds"]:
            texts += [r["critique_request"], r["critique"], r["revision_request"], r["revision"]]
    else:
        texts = [record["prompt"], record["chosen"], record["rejected"]]
        texts += [j.get("reasoning", "") for j in record["judgments"]]
    return [as_text(text) for text in texts]


def filter_records(artifact: Artifact, principle: str | None, grep: str | None) -> list[dict]:
    records = artifact.records
    if principle is not None:
        records = [r for r in records if principle in principles_of(r, artifact.kind)]
    if grep is not None:
        needle = grep.casefold()
        records = [r for r in records
                   if any(needle in text.casefold() for text in texts_of(r, artifact.kind))]
    return records


def describe_filters(principle: str | None, grep: str | None) -> str:
    parts = ([f"--principle {principle}"] if principle is not None else []) + \
            ([f"--grep {grep!r}"] if grep is not None else [])
    return " and ".join(parts)


def disagreeing_principles(record: dict) -> list[str] | None:
    """Principles whose two answer orders put the preference on opposite sides of 0.5.

    p_first is the probability of whichever answer was shown first, so the AB score and one minus
    the BA score both speak for the same answer. None when no principle was judged in both orders.
    Several judgments of one principle and order (e.g. samples) are averaged first.
    """
    scores: dict[tuple[str, str], list[float]] = defaultdict(list)
    for j in record["judgments"]:
        scores[str(j["principle"]), str(j["order"]).upper()].append(float(j["p_first"]))
    principles = dict.fromkeys(principle for principle, _ in scores)
    both = [p for p in principles if (p, "AB") in scores and (p, "BA") in scores]
    if not both:
        return None
    return [p for p in both
            if (mean(scores[p, "AB"]) - 0.5) * ((1 - mean(scores[p, "BA"])) - 0.5) < 0]


def orders_disagree(record: dict) -> bool | None:
    flag = record.get("order_disagreement")
    if isinstance(flag, bool):
        return flag
    if isinstance(flag, (int, float)):
        # Read as the share of principles whose orders disagree: any at all makes the pair count.
        return flag > 0
    found = disagreeing_principles(record)
    return None if found is None else bool(found)


def share(count: int, total: int) -> str:
    return f"{count} of {total} ({count / total:.0%})" if total else "n/a"


# ---------------------------------------------------------------------------------------------
# Summary view


def show_summary(console: Console, artifact: Artifact, principle: str | None, grep: str | None,
                 limit: int) -> None:
    noun = artifact.kind or "records"
    # soft_wrap: a long path is left for the terminal to wrap, never broken by rich.
    title = Text.assemble((str(artifact.path), "bold"), f" — {len(artifact.records)} {noun}")
    console.print(title, soft_wrap=True)
    if artifact.unfinished:
        console.print(Text(f"unfinished: the stage was interrupted; rerun "
                           f"`{MAKER.get(artifact.kind, 'the stage')}` to finish", style="yellow"))
    if not artifact.records:
        console.print("no records yet")
        return
    records = filter_records(artifact, principle, grep)
    filters = describe_filters(principle, grep)
    if filters:
        if not records:
            print_no_match(console, artifact, principle, filters)
            return
        console.print(f"{filters}: {len(records)} of {len(artifact.records)} {noun} match")
    console.print()
    if artifact.kind == CHAINS:
        chain_summary(console, records)
    else:
        pair_summary(console, records)
    record_list(console, artifact.kind, records, limit)


def print_no_match(console: Console, artifact: Artifact, principle: str | None,
                   filters: str) -> None:
    console.print(f"no {artifact.kind} match {filters} ({len(artifact.records)} in the file)")
    used = Counter(p for r in artifact.records for p in principles_of(r, artifact.kind))
    if principle is not None and principle not in used:
        console.print(f"principles used there: {', '.join(sorted(used))}")


def stats_table() -> Table:
    table = Table(box=None, show_header=False, padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    return table


def principle_table(counts: Counter, what: str) -> Table:
    table = Table(box=box.SIMPLE, show_edge=False, padding=(0, 2))
    table.add_column("principle")
    table.add_column(what, justify="right")
    table.add_column("share", justify="right")
    total = sum(counts.values())
    # Most used first; ties alphabetical so the order is stable between runs.
    for name, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        table.add_row(Text(name), str(count), f"{count / total:.0%}")
    return table


def chain_summary(console: Console, records: list[dict]) -> None:
    rounds = sum(len(r["rounds"]) for r in records)
    changed = 0
    for record in records:
        # Round 0 revises the initial answer, each later round the revision before it.
        previous = record["initial"]
        for step in record["rounds"]:
            changed += not same_text(step["revision"], previous)
            previous = step["revision"]
    final_changed = sum(not same_text(r["final"], r["initial"]) for r in records)

    table = stats_table()
    table.add_row("chains", str(len(records)))
    table.add_row("critique/revision rounds", f"{rounds} ({rounds / len(records):.1f} per chain)")
    table.add_row("mean length in words", "prompt {:.0f} · initial {:.0f} · final {:.0f}".format(
        *(mean(words(r[key]) for r in records) for key in ("prompt", "initial", "final"))))
    table.add_row("revisions that changed the text", share(changed, rounds))
    table.add_row("finals that differ from initial", share(final_changed, len(records)))
    console.print(table, "")
    counts = Counter(str(step["principle"]) for r in records for step in r["rounds"])
    if counts:
        console.print(principle_table(counts, "rounds"), "")


def pair_summary(console: Console, records: list[dict]) -> None:
    judgments = sum(len(r["judgments"]) for r in records)
    verdicts = [orders_disagree(r) for r in records]
    both_orders = [v for v in verdicts if v is not None]

    table = stats_table()
    table.add_row("pairs", str(len(records)))
    table.add_row("judgments", f"{judgments} ({judgments / len(records):.1f} per pair)")
    table.add_row("mean confidence |p_chosen-0.5|",
                  f"{mean(abs(float(r['p_chosen']) - 0.5) for r in records):.2f}")
    # Only pairs judged in both orders can show position bias, so they are the denominator.
    table.add_row("orders disagree", f"{sum(both_orders)} of {len(both_orders)} pairs judged in "
                  f"both orders ({sum(both_orders) / len(both_orders):.0%})"
                  if both_orders else "n/a (no pair was judged in both orders)")
    figures = label_diagnostics(records)
    if figures["position_bias"] is not None:
        table.add_row("position bias (mean p of first option)", f"{figures['position_bias']:.2f}"
                      f" (first option wins {figures['first_wins']:.0%} of judgments)")
    if figures["order_agreement"] is not None:
        table.add_row("orders agree (pair-principles)", f"{figures['order_agreement']:.0%}")
    quant = figures["p_chosen"]
    table.add_row("p_chosen min / median / max",
                  f"{quant['min']:.2f} / {quant['median']:.2f} / {quant['max']:.2f}")
    table.add_row("p_chosen histogram", "  ".join(
        f"{name}: {count}" for name, count in figures["p_chosen_histogram"].items()))
    console.print(table, "")
    console.print(Text(figures["verdict"], style="yellow" if "little signal" in figures["verdict"]
                       else ""), "")
    counts = Counter(str(j["principle"]) for r in records for j in r["judgments"])
    if counts:
        console.print(principle_table(counts, "judgments"), "")


def record_list(console: Console, kind: str, records: list[dict], limit: int) -> None:
    if limit == 0:
        return
    # Only the prompt (and a long principle list) give way when the line is full: rich narrows
    # wrappable columns first, and the prompt cell itself is one line with the rest elided (the
    # full text is one --index away). So ids and numbers are never cut.
    table = Table(box=box.SIMPLE, show_edge=False, padding=(0, 1))
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("id", no_wrap=True)
    if kind == PAIRS:
        table.add_column("p_chosen", justify="right", no_wrap=True)
    table.add_column("principles", max_width=30)
    table.add_column("prompt")
    for position, record in enumerate(records[:limit]):
        prompt = " ".join(as_text(record["prompt"]).split())
        row = [str(position), Text(str(record["id"]))]
        if kind == PAIRS:
            row.append(f"{float(record['p_chosen']):.2f}")
        row += [Text(", ".join(principles_of(record, kind))),
                Text(prompt, no_wrap=True, overflow="ellipsis")]
        table.add_row(*row)
    console.print(table)
    more = f"showing {limit} of {len(records)}; --limit N shows more. " \
        if len(records) > limit else ""
    console.print(f"{more}Open one with --index N (the # column) or --id ID.")


# ---------------------------------------------------------------------------------------------
# One record


def show_records(console: Console, artifacts: list[Artifact], record_id: str | None,
                 index: int | None, principle: str | None, grep: str | None) -> None:
    """Show the record(s) asked for; in a run dir the same id may be both a chain and a pair."""
    filters = describe_filters(principle, grep)
    shown, searched = 0, []
    for artifact in artifacts:
        records = filter_records(artifact, principle, grep) if artifact.kind else []
        if filters and artifact.records and not records:
            print_no_match(console, artifact, principle, filters)
            continue
        if record_id is not None:
            matches = [(i, r) for i, r in enumerate(records) if str(r["id"]) == record_id]
        else:
            matches = [(index, records[index])] if 0 <= index < len(records) else []
        for position, record in matches:
            if shown:
                console.print()
            where = f"{artifact.path}, #{position} of {len(records)}"
            if filters:
                where += f" matching {filters}"
            if artifact.unfinished:
                where += ", unfinished"
            (show_chain if artifact.kind == CHAINS else show_pair)(console, record, where)
            shown += 1
        searched.append((artifact, records))
    if shown or not searched:
        return  # found, or every file was already reported as not matching the filters

    def what_exists(artifact: Artifact, records: list[dict]) -> str:
        count = f"{len(records)} of {len(artifact.records)} records match {filters}" if filters \
            else f"{len(records)} records"
        return f"{artifact.path} ({count})"

    where = " or ".join(what_exists(a, r) for a, r in searched)
    if record_id is not None:
        ids = [str(r["id"]) for _, records in searched for r in records]
        sample = ", ".join(ids[:5]) + (", ..." if len(ids) > 5 else "")
        raise UserError(f"no record with id {record_id!r} in {where}"
                        + (f"; ids there: {sample}" if ids else ""))
    raise UserError(f"no record at --index {index} in {where}; the index counts from 0 "
                    "(the # column of the summary list)")


def heading(console: Console, title: str, where: str) -> None:
    console.rule(Text(title, style="bold"), align="left")
    console.print(Text(where, style="dim"), soft_wrap=True)  # a rule would cut a long path
    console.print()


def block(console: Console, label: str, value) -> None:
    """A labelled text, indented under its label. Text objects, so [brackets] stay literal."""
    console.print(Text(label, style="bold"))
    console.print(Padding(Text(as_text(value).strip() or "(empty)"), (0, 0, 1, 2), expand=False))


def show_chain(console: Console, record: dict, where: str) -> None:
    heading(console, f"chain {record['id']}", where)
    block(console, "User prompt", record["prompt"])
    block(console, "Initial answer", record["initial"])
    previous = record["initial"]
    for k, step in enumerate(record["rounds"], start=1):
        console.rule(Text(f"Round {k} — principle {step['principle']}"), align="left")
        block(console, "Critique request", step["critique_request"])
        block(console, "Critique", step["critique"])
        block(console, "Revision request", step["revision_request"])
        unchanged = " (unchanged: same as the text it revised)" \
            if same_text(step["revision"], previous) else ""
        block(console, f"Revision{unchanged}", step["revision"])
        previous = step["revision"]

    console.rule(Text("Final answer"), align="left")
    if record["rounds"] and as_text(record["final"]) == as_text(previous):
        console.print("the last revision above\n")
    else:
        block(console, "Final answer", record["final"])
    if same_text(record["initial"], record["final"]):
        console.print("the final answer is the same as the initial answer")
        return
    # No colour when piped (or NO_COLOR): mark the edits in the text itself.
    plain = console.color_system is None
    diff, removed, added = word_diff(as_text(record["initial"]), as_text(record["final"]), plain)
    legend = "[-removed-] {+added+}" if plain else "red struck out = removed, green = added"
    console.print(Text(f"Initial → final: {removed} words removed, {added} added ({legend})",
                       style="bold"))
    console.print(Padding(diff, (0, 0, 0, 2), expand=False))


def word_diff(old: str, new: str, plain: bool) -> tuple[Text, int, int]:
    """Word-level diff of two texts, as styled text or with [-...-]{+...+} markers."""
    a, b = old.split(), new.split()
    # Segments [old words, new words, equal?], alternating equal and edited. autojunk off: with
    # it, frequent words in texts over 200 words are ignored and the diff jumps about.
    segments: list[list] = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        gone, came, equal = a[i1:i2], b[j1:j2], op == "equal"
        # A rewrite shares stray words ("a", "the") with the old text, and a diff that keeps them
        # reads as confetti: fold an equal run shorter than the edits on both sides into them.
        if not equal and len(segments) >= 2 and segments[-1][2]:
            kept, before = segments[-1][0], segments[-2]
            if len(kept) < min(max(len(gone), len(came)), max(len(before[0]), len(before[1]))):
                segments.pop()
                before[0] += kept
                before[1] += kept
        if not equal and segments and not segments[-1][2]:
            segments[-1][0] += gone
            segments[-1][1] += came
        else:
            segments.append([gone, came, equal])

    out, removed, added = Text(), 0, 0
    for gone, came, equal in segments:
        if equal:
            out.append(" ".join(gone) + " ")
            continue
        if gone:
            text = " ".join(gone)
            out.append(f"[-{text}-]" if plain else text, style="" if plain else "red strike")
            out.append(" ")
            removed += len(gone)
        if came:
            text = " ".join(came)
            out.append(f"{{+{text}+}}" if plain else text, style="" if plain else "green")
            out.append(" ")
            added += len(came)
    out.rstrip()
    return out, removed, added


def show_pair(console: Console, record: dict, where: str) -> None:
    heading(console, f"pair {record['id']}", where)
    prompt = record["prompt"]
    # Usually one user turn; a multi-turn prompt shows its earlier assistant turns too.
    for message in prompt if isinstance(prompt, list) else [prompt]:
        role = str(message.get("role", "user")) if isinstance(message, dict) else "user"
        block(console, role.capitalize(), message)

    p_chosen = float(record["p_chosen"])
    answers = Table(box=box.SIMPLE, show_edge=False, expand=True, padding=(0, 1))
    answers.add_column(f"chosen (p={p_chosen:.2f})", ratio=1)
    answers.add_column(f"rejected (p={1 - p_chosen:.2f})", ratio=1)
    answers.add_row(Text(as_text(record["chosen"]).strip()),
                    Text(as_text(record["rejected"]).strip()))
    console.print(answers, "")

    judgments = record["judgments"]
    with_reasoning = any(j.get("reasoning") for j in judgments)
    table = Table(box=box.SIMPLE, show_edge=False, padding=(0, 1), title="Judgments",
                  title_justify="left", title_style="bold")
    table.add_column("principle")
    table.add_column("order", no_wrap=True)
    table.add_column("p_first", justify="right", no_wrap=True)
    if with_reasoning:
        table.add_column("reasoning", ratio=1)
    for j in judgments:
        row = [Text(str(j["principle"])), str(j["order"]), f"{float(j['p_first']):.2f}"]
        if with_reasoning:
            row.append(Text(as_text(j.get("reasoning", "")).strip()))
        table.add_row(*row)
    console.print(table, "")
    console.print("order AB: the chosen answer was shown first as (A); BA: the rejected one was. "
                  "p_first: the probability the judge gave the answer shown first")
    flipped = disagreeing_principles(record)
    if flipped:
        console.print(f"orders disagree (position bias) for: {', '.join(flipped)}")
    elif flipped is not None:
        console.print("both orders agree for every principle judged in both")


# ---------------------------------------------------------------------------------------------
# Generated prompts (cai generate-prompts)

PROMPTS_FILE = "prompts/red_team.jsonl"


def generated_prompts_file(path: Path) -> Path | None:
    """``path`` if it is a file of generated prompts (records with ``seed_ids``), or a run
    directory's ``prompts/red_team.jsonl``; else None."""
    if path.is_dir():
        return path / PROMPTS_FILE if (path / PROMPTS_FILE).is_file() else None
    if path.is_file() and path.suffix == ".jsonl":
        with path.open(encoding="utf-8", errors="replace") as handle:
            first = handle.readline()
        try:
            return path if "seed_ids" in json.loads(first) else None
        except (json.JSONDecodeError, TypeError):
            return None
    return None


def show_generated_prompts(console: Console, path: Path, record_id: str | None,
                           index: int | None, grep: str | None, limit: int) -> None:
    """Each new prompt with the seed prompts it was shown (from ``seeds.jsonl`` beside it)."""
    # (hostile: typed, so a record without an id or prompt is a message naming its line)
    from cai_cli.run.records import GeneratedPrompt, SeedPrompt, read

    records = [shown(r.model_dump()) for r in read(path, GeneratedPrompt)]
    seeds_file = path.with_name("seeds.jsonl")
    seeds = ({shown(r.id): shown(r.prompt) for r in read(seeds_file, SeedPrompt)}
             if seeds_file.is_file() else {})
    new = sum(bool(r.get("seed_ids")) for r in records)
    console.print(Text.assemble((str(path), "bold"), f" — {new} generated prompts"
                                + (f", {len(records) - new} seed prompts mixed in"
                                   if len(records) > new else "")), soft_wrap=True)
    chosen = list(enumerate(records))
    if grep is not None:
        chosen = [(i, r) for i, r in chosen if grep.casefold() in str(r["prompt"]).casefold()]
    if record_id is not None:
        chosen = [(i, r) for i, r in chosen if str(r["id"]) == record_id]
    elif index is not None:
        chosen = [(i, r) for i, r in chosen if i == index]
    if (record_id is not None or index is not None) and not chosen:
        raise UserError(f"no generated prompt {'with id ' + repr(record_id) if record_id else f'at --index {index}'} in {path}")
    listed = chosen if record_id is not None or index is not None else chosen[:limit]
    for position, record in listed:
        console.print()
        console.print(Text.assemble((f"#{position} {record['id']}", "bold"), "  ",
                                    str(record["prompt"])), soft_wrap=True)
        if not record.get("seed_ids"):
            console.print(Text("  (a seed prompt, mixed in)", style="dim"))
        for seed_id in record.get("seed_ids") or []:
            console.print(Text(f"  seed {seed_id}: {seeds.get(seed_id, '(not in seeds.jsonl)')}",
                               style="dim"), soft_wrap=True)
    if len(chosen) > len(listed):
        console.print(f"\nshowing {len(listed)} of {len(chosen)}; --limit N shows more, "
                      "--index N one")
