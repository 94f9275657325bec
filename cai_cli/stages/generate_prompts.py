"""``cai generate-prompts``: new red-team prompts, written by a model from few-shot seed prompts.

Each request shows the model ``few_shot`` seed prompts drawn with a generator seeded by (seed,
request number), as a numbered list, and asks for ``per_request`` new ones in the same style: a
chat model is asked in a user message, a base model continues the list. Requests run in
checkpointed batches into ``prompts/candidates.jsonl`` (each sampled with the seed of its
request, so the output does not depend on batching, on being interrupted or on the shard it ran
in: ``--shard I/N`` cuts the requests as ``cai_cli.run.shards`` says). When every request is done
(the shards merged), the filters run over the candidates in order and the survivors go to
``prompts/red_team.jsonl`` (``{"id", "prompt", "seed_ids", "request"}``, the prompt loader's
default field), with ``prompts/seeds.jsonl`` holding the seeds they were shown. The manifest
counts what each filter dropped: ``generated`` = ``kept`` + the sum of the filters' counts.

``candidates.jsonl`` (unsharded) and ``feedback.jsonl`` keep their progress state, with a
fingerprint of what decides them, once finished: replacing the output of another config reuses
them when only the filters changed (``generation_fingerprint``, ``feedback_fingerprint``);
``--force`` on output of the current config redoes both.
"""

from __future__ import annotations

import random
import re
import unicodedata
from pathlib import Path

from cai_cli import ui
from cai_cli.config import Config, PromptSource
from cai_cli.data.sources import Prompt, load_prompts, prompt_id
from cai_cli.engines.base import Overflow, SamplingParams
from cai_cli.engines.prompts import OPTIONS, classification_prompt, render, resolve_format
from cai_cli.engines.work import Generate, Score, Work
from cai_cli.errors import UserError
from cai_cli.run.artifacts import (ResumableJsonl, config_hash, model_fingerprint, read_jsonl,
                                   sha256_bytes, source_fingerprint, write_jsonl_atomic)
from cai_cli.run.seeding import draw, record_seed
from cai_cli.run.spec import StageSpec
from cai_cli.stages.base import RecordStage
from cai_cli.stages.checkpointed import checkpointed
from cai_cli.stages.common import NothingMade, StageRun, checkpoint_batches

# What each filter drops, in the order they are applied (the manifest's counts use these names).
FILTERS = ("parse_failures", "overflow", "too_short", "too_long", "unreadable", "seed_copies",
           "duplicates", "near_duplicates", "feedback_rejected")
# Settings that only decide which candidates are kept: a change reuses prompts/candidates.jsonl.
FILTER_SETTINGS = ("min_chars", "max_chars", "min_readable", "min_words", "ngram", "max_overlap",
                   "feedback_filter", "feedback_question", "feedback_threshold", "mix_seeds")
NUMBERED = re.compile(r"^\s*(\d+)\s*[.)]\s*(.*)$")
BULLET = re.compile(r"^\s*[-*\u2022]\s+")
INLINE_NUMBER = re.compile(r"(?:^|(?<=\s))(\d+)[.)](?=\s)")
NUMBER = re.compile(r"[$\u20ac\u00a3]?\d+(?:[.,:/]\d+)*(?:%|st|nd|rd|th|s|am|pm)?")
WORD_SHAPE = re.compile(r"l+|u+|l?(?:ul+)+")  # cased letters: l lower, u upper
MAX_WORD = 40  # letters in a plain word at most ("Bundesverfassungsgericht" has 24)
# Scripts written without spaces between words: a run of their letters is a phrase, not a word.
SPACELESS = ("CJK ", "IDEOGRAPHIC ", "HIRAGANA", "KATAKANA", "THAI ", "LAO ", "KHMER ",
             "MYANMAR ", "TIBETAN ")
HYPHENS = re.compile(r"[-\u2010\u2011]")


def seed_source(config: Config) -> PromptSource:
    """Where the seed prompts come from; refuses to read this stage's own output."""
    source = config.generate_prompts.seeds or config.data.red_team
    if source.path and Path(source.path).expanduser().resolve() == \
            config.layout.generated_prompts.resolve():
        raise UserError(f"{'generate_prompts.seeds' if config.generate_prompts.seeds else 'data.red_team'}"
                        f".path names this stage's output ({source.path}); set "
                        "generate_prompts.seeds to the seed prompts")
    return source


def stage_spec(config: Config) -> StageSpec:
    settings = config.generate_prompts.model_dump(mode="json")
    settings.pop("enabled")  # whether cai run includes it does not change the output
    source = config.generate_prompts.seeds or config.data.red_team
    inputs = {"seeds": source_fingerprint(source),
              "policy": model_fingerprint(config.models.policy.name_or_path)}
    out = {"seed": config.seed, "seeds": source.model_dump(mode="json"),
           "models.policy": config.models.policy.model_dump(mode="json"), "generate_prompts": settings}
    if config.generate_prompts.include_helpful and config.data.helpful is not None:
        out["data.helpful"] = config.data.helpful.model_dump(mode="json")
        inputs["helpful"] = source_fingerprint(config.data.helpful)
    if config.generate_prompts.feedback_filter:
        out["models.feedback"] = config.feedback_model.model_dump(mode="json")
        # the feedback model is asked as label-prefs asks it
        out["label_prefs"] = {key: getattr(config.label_prefs, key)
                              for key in ("prompt_format", "verdict_samples")}
        inputs["feedback"] = model_fingerprint(config.feedback_model.name_or_path)
    return StageSpec("generate-prompts", config.layout.stage_dir("generate-prompts"), out, inputs,
                     shardable=True)


def generation_fingerprint(stage: StageSpec) -> str:
    """What decides ``prompts/candidates.jsonl``: the stage's settings and inputs but the
    filters' (a run that replaces output made with other filter settings reuses it)."""
    settings = {key: value for key, value in stage.settings.items()
                if key not in ("models.feedback", "label_prefs")}
    settings["generate_prompts"] = {key: value for key, value in
                                    settings["generate_prompts"].items()
                                    if key not in FILTER_SETTINGS}
    inputs = {key: value for key, value in stage.inputs.items() if key != "feedback"}
    return config_hash({"settings": settings, "inputs": inputs})


def feedback_fingerprint(config: Config, stage: StageSpec, kept: list[dict]) -> str:
    """What decides ``prompts/feedback.jsonl``: the feedback model and how it is asked, the
    question, the prompts asked (and their batches); not the threshold, which only reads it."""
    settings = config.generate_prompts
    return config_hash({
        "models.feedback": stage.settings["models.feedback"],
        "label_prefs": stage.settings["label_prefs"], "model": stage.inputs["feedback"],
        "seed": config.seed, "question": settings.feedback_question,
        "batch": settings.prompts_per_checkpoint,
        "asked": sha256_bytes("\n".join(r["prompt"] for r in kept).encode())})


def load_seeds(config: Config) -> list[Prompt]:
    seeds = load_prompts(seed_source(config), config.seed,
                         "generate_prompts.seeds" if config.generate_prompts.seeds else "data.red_team")
    if config.generate_prompts.include_helpful:
        if config.data.helpful is None:
            raise UserError("generate_prompts.include_helpful is true but data.helpful is not set")
        known = {p.id for p in seeds}
        seeds += [p for p in load_prompts(config.data.helpful, config.seed, "data.helpful")
                  if p.id not in known]
    return seeds


def requests(config: Config) -> list[tuple[int, int]]:
    """``(request number, prompts asked for)`` of every request."""
    total, per = config.generate_prompts.num_prompts, config.generate_prompts.per_request
    return [(i, min(per, total - i * per)) for i in range(-(-total // per))]


def shown_seeds(config: Config, seeds: list[Prompt], request: int) -> list[Prompt]:
    rng = random.Random(f"{config.seed}:generate-prompts:{request}")
    return draw(rng, tuple(seeds), min(config.generate_prompts.few_shot, len(seeds)))


def request_prompt(config: Config, shown: list[Prompt], count: int, fmt: str):
    """The few-shot request: chat asks for ``count`` new prompts as a numbered list going on
    from the examples; transcript leaves the next number open for a base model to continue."""
    settings = config.generate_prompts
    listing = "\n".join(f"{n}. {one_line(p.text)}" for n, p in enumerate(shown, start=1))
    if fmt == "transcript":
        return f"{settings.instruction}\n\n{listing}\n{len(shown) + 1}."
    what = "one new request" if count == 1 else f"{count} new requests"
    ask = (f"{settings.instruction}\n\n{listing}\n\nWrite {what} in the same style, on other "
           f"topics. Reply with a numbered list only, starting at {len(shown) + 1}.")
    return render([("human", ask)], "assistant", "chat")


def one_line(text: str) -> str:
    return " ".join(text.split())


def parse(text: str, shown: int, count: int, fmt: str) -> list[str]:
    """The new prompts in a model's reply: the numbered items (a base model's continuation
    starts right after the open number; a chat model may number its list from 1: the
    seed-copy filter drops any example it repeats), else non-empty lines (a bullet mark taken
    off). A list run together
    on one line ("... 1. How do I ...? 2. What is ...?") is split at its numbers."""
    if fmt == "transcript":
        text = f"{shown + 1}.{text}"
    lines = [item for line in text.splitlines() for item in split_inline(line)]
    items = []
    for line in lines:
        match = NUMBERED.match(line)
        if match and (fmt == "chat" or int(match.group(1)) > shown):
            items.append(match.group(2))
    if not items and fmt == "chat" and not any(NUMBERED.match(line) for line in lines):
        items = [BULLET.sub("", line) for line in lines if line.strip()]
    items = [item.strip().strip('"\u201c\u201d').strip() for item in items]
    return [item for item in items if item][:count]


def split_inline(line: str) -> list[str]:
    """``line`` cut before each number of a run of consecutive ones (``1.``, ``2.``, ... each
    after a space and before one); the text before the first is a line of its own. A single
    number inside a line ("in 20 years.") is left alone."""
    marks = list(INLINE_NUMBER.finditer(line))
    cuts, expected = [], None
    for mark in marks:
        number = int(mark.group(1))
        if expected is None or number == expected:
            cuts.append(mark.start(1))
            expected = number + 1
    if len(cuts) < 2:
        return [line]
    pieces = [line[:cuts[0]]] + [line[a:b] for a, b in zip(cuts, cuts[1:] + [len(line)])]
    return [piece.strip() for piece in pieces if piece.strip()]


# A character no readable request holds: control characters (but tabs and line ends), the
# replacement character of undecodable bytes, private-use and unassigned code points.
def _garbage(char: str) -> bool:
    return char == "\ufffd" or (unicodedata.category(char) in ("Cc", "Co", "Cn", "Cs")
                                 and char not in "\t\n\r")


def _punctuation(char: str) -> bool:
    """Punctuation in any script (``?`` and ``？``, ``«``, ``—``, ``。``), a backtick or tilde,
    and pictographs (an emoji): what may stand around a word."""
    category = unicodedata.category(char)
    return category[0] == "P" or category == "So" or char in "`~"


def _spaceless(char: str) -> bool:
    return unicodedata.name(char, "").startswith(SPACELESS)


def _kind(part: str) -> str | None:
    """``word`` (letters in a plain shape), ``number`` ("20", "$500", "5th", "3D", "MP3"), or
    None (anything else). A word's letters may carry combining marks (Devanagari, Arabic
    vowel signs), all of one script (or beside letters of a script written without spaces:
    "iPhone手机"); only the cased letters' shape is checked (a script without case has none)."""
    if NUMBER.fullmatch(part) or (len(part) <= 6 and part.isalnum() and part.upper() == part
                                  and any(c.isdigit() for c in part)):
        return "number"
    if not part[0].isalpha() or not all(c.isalpha() or unicodedata.category(c)[0] == "M"
                                        for c in part):
        return None
    shape = "".join("u" if c.isupper() else "l" for c in part if c.isupper() or c.islower())
    if shape and not WORD_SHAPE.fullmatch(shape):
        return None
    spaced = [c for c in part if c.isalpha() and not _spaceless(c)]
    if len(spaced) > MAX_WORD or len({unicodedata.name(c, "?").split()[0] for c in spaced}) > 1:
        return None  # too long, or letters of two scripts run together ("Whyدام")
    return "word"


def readability(text: str) -> tuple[float, int]:
    """``(share, words)``: the share of ``text``'s non-space characters that are in plain words
    or numbers, and how many plain words it has. A plain word is letters only (combining marks
    and an apostrophe inside allowed, the parts of a hyphenated word each checked, punctuation
    of any script around it ignored and splitting it where it is not ASCII, as ``，`` and
    ``。`` in Chinese), in lower case, capitalised, all capitals or in capitalised parts
    ("YouTube", "iPhone"), at most 40 letters: what a sentence is made of, not the noise of a
    weak model ("coldWhydam", "x.x.X.S", "friends<br>You"), markup or addresses. In scripts
    written without spaces every letter counts as a word. Text with a control or replacement
    character scores 0."""
    if any(_garbage(char) for char in text):
        return 0.0, 0
    total = plain = words = 0
    for token in text.split():
        total += len(token)
        core = token.strip("".join(c for c in token if _punctuation(c)))
        core = re.sub(r"(?<=\w)['\u2019](?=\w)", "", core)  # it's, don't
        core = "".join(" " if ord(c) > 127 and _punctuation(c) else c for c in core)
        parts = [part for piece in core.split() for part in HYPHENS.split(piece)]
        if not parts:
            plain += len(token)  # punctuation on its own ("-", "...", "？")
            continue
        kinds = [_kind(part) if part else None for part in parts]
        if all(kinds):
            plain += len(token)
            found = [part for part, kind in zip(parts, kinds) if kind == "word"]
            spaceless = sum(_spaceless(c) for part in found for c in part)
            # a word, or a hyphenated one ("3D-printed"), counts once; spaceless letters each
            words += spaceless + any(not _spaceless(c) for part in found for c in part)
    return (plain / total if total else 0.0), words


def readable(text: str, settings) -> bool:
    share, words = readability(text)
    return share >= settings.min_readable and words >= settings.min_words


def request_calls(config: Config, seeds: list[Prompt], batch: list[tuple[int, int]],
                  fmt: str) -> list[tuple[list[int], list, SamplingParams]]:
    """The engine calls of one batch of requests: ``(rows of the batch, prompts, params)``.
    A base model's stops depend on how many seeds a request shows (fewer than few_shot when
    there are few): one call per kind of stop."""
    sampling = config.generate_prompts.sampling
    shown = [shown_seeds(config, seeds, number) for number, _ in batch]
    inputs = [request_prompt(config, s, count, fmt) for s, (_, count) in zip(shown, batch)]
    stops = [(("\n\n", f"\n{len(s) + count + 1}.") if fmt == "transcript" else ())
             for s, (_, count) in zip(shown, batch)]
    calls = []
    for stop in dict.fromkeys(stops):
        rows = [i for i, s in enumerate(stops) if s == stop]
        params = SamplingParams(max_new_tokens=sampling.max_new_tokens,
                                temperature=sampling.temperature, top_p=sampling.top_p,
                                top_k=sampling.top_k, stop=stop)
        calls.append((rows, [inputs[i] for i in rows], params))
    return calls


def forget(path: Path) -> None:
    """Drop the progress of a ``ResumableJsonl`` output, so that the next run makes it anew."""
    ResumableJsonl(path, "").state_path.unlink(missing_ok=True)


def make_requests(config: Config, seeds: list[Prompt]):
    """The batch function of ``checkpointed``: a batch of requests into candidate records."""
    formats: dict = {}

    def make(backend, batch: list[tuple[int, int]], step) -> list[dict]:
        if backend not in formats:
            formats.clear()
            formats[backend] = resolve_format(config.generate_prompts.prompt_format, backend,
                                              "generate_prompts.prompt_format")
        fmt = formats[backend]
        results = []
        for rows, prompts, params in request_calls(config, seeds, batch, fmt):
            out = backend.generate(prompts, params, seeds=[
                record_seed(config.seed, "generate-prompts", batch[i][0]) for i in rows])
            results += list(zip(rows, out))
        records = []
        for row, result in sorted(results, key=lambda item: item[0]):
            number, count = batch[row]
            shown = shown_seeds(config, seeds, number)
            record = {"request": number, "asked": count, "seed_ids": [p.id for p in shown],
                      "format": fmt}
            if isinstance(result, Overflow):
                record.update(overflow=True, text=None, prompts=[])
            else:
                step.extra["tokens"] = step.extra.get("tokens", 0) + result.tokens
                record.update(text=result.text, prompts=parse(result.text, len(shown), count, fmt))
            records.append(record)
        return records

    return make

def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = normalise(text).split()
    return {tuple(words[i:i + n]) for i in range(max(len(words) - n + 1, 1))} if words else set()


class NearDuplicates:
    """The word n-grams of the texts added so far: ``overlap(text)`` is the share of ``text``'s
    n-grams found among them, so a prompt stitched together from pieces of two seeds
    ("<seed one> - <seed two>") counts as a near duplicate as a reworded copy of one does."""

    def __init__(self, n: int):
        self.n, self.grams = n, set()

    def add(self, text: str) -> None:
        self.grams.update(ngrams(text, self.n))

    def overlap(self, text: str) -> float:
        grams = ngrams(text, self.n)
        return sum(gram in self.grams for gram in grams) / max(len(grams), 1)


def apply_filters(config: Config, candidates: list[dict], seeds: list[Prompt]) -> tuple[list[dict], dict]:
    """The kept prompts (before the feedback filter) and the counts of every filter."""
    settings = config.generate_prompts
    counts = dict.fromkeys(FILTERS, 0)
    seed_texts = {normalise(p.text) for p in seeds}
    near = NearDuplicates(settings.ngram)
    for p in seeds:
        near.add(p.text)
    seen: set[str] = set()
    kept = []
    for record in candidates:
        if record.get("overflow"):
            counts["overflow"] += record["asked"]
            continue
        counts["parse_failures"] += record["asked"] - len(record["prompts"])
        for text in record["prompts"]:
            key = normalise(text)
            reason = ("too_short" if len(text) < settings.min_chars
                      else "too_long" if len(text) > settings.max_chars
                      else "unreadable" if not readable(text, settings)
                      else "seed_copies" if key in seed_texts
                      else "duplicates" if key in seen
                      else "near_duplicates" if near.overlap(text) > settings.max_overlap
                      else None)
            if reason:
                counts[reason] += 1
                continue
            seen.add(key)
            near.add(text)
            kept.append({"id": prompt_id(text), "prompt": text, "seed_ids": record["seed_ids"],
                         "request": record["request"]})
    return kept, counts


def feedback_filter(config: Config, run: StageRun, kept: list[dict]) -> tuple[list[dict], int]:
    """Ask the feedback model the yes/no question about each prompt
    (``engines.judge.yes_probabilities``: the options in both orders, averaged; sampled verdicts
    for a model without log-probabilities); keep those whose probability of Yes reaches the
    threshold.

    The answers go to ``prompts/feedback.jsonl`` (``{"id", "p_yes", "p_yes_by_order",
    "source"}``, in the order of ``kept``) in checkpointed batches, so an interrupted filter pass
    resumes after its last whole batch. Its fingerprint is ``feedback_fingerprint``, kept beside
    it once finished: a later run that asks the same questions (another threshold, say) reads
    the answers instead of asking again."""
    from cai_cli.engines.judge import VERDICT_ADVICE, yes_probabilities

    settings, layout = config.generate_prompts, config.layout
    samples = config.label_prefs.verdict_samples
    warned: list[str] = []

    def on_verdicts(why: str) -> None:
        if not warned:
            warned.append(why)
            ui.warn(f"{why}: the feedback filter's P(Yes) are sampled verdicts ({samples} per "
                    "question, label_prefs.verdict_samples; source 'verdict' in "
                    f"feedback.jsonl), not probabilities; {VERDICT_ADVICE}")

    def make(backend, batch: list[dict], step) -> list[dict]:
        fmt = resolve_format(config.label_prefs.prompt_format, backend,
                             "label_prefs.prompt_format")
        answers = yes_probabilities(
            backend, fmt, [(record["prompt"], None) for record in batch],
            settings.feedback_question, [record["id"] for record in batch],
            seed=config.seed, verdict_samples=samples, on_verdicts=on_verdicts)
        return [{"id": record["id"], "p_yes": None} if answer is None else
                {"id": record["id"], "p_yes": round(answer.p_yes, 6),
                 "p_yes_by_order": [round(p, 6) for p in answer.by_order],
                 "source": answer.source}
                for record, answer in zip(batch, answers)]

    writer = checkpointed(run, layout.prompt_feedback,
                          checkpoint_batches(kept, settings.prompts_per_checkpoint), make,
                          label="feedback filter", engine=(config.feedback_model, config.feedback_key),
                          fingerprint=feedback_fingerprint(config, run.spec, kept), keep=True)
    answers = writer.records()
    assert [a["id"] for a in answers] == [r["id"] for r in kept], "feedback.jsonl out of step"
    out, overflow = [], 0
    for record, answer in zip(kept, answers):
        if answer["p_yes"] is None:
            overflow += 1
        elif answer["p_yes"] >= settings.feedback_threshold:
            out.append({**record, "p_yes": answer["p_yes"]})
    if overflow:
        ui.warn(f"feedback filter: {overflow} prompts did not fit the feedback model's context "
                "and are dropped (counted as feedback_rejected)")
    return out, len(kept) - len(out)

def finish_stage(config: Config, run: StageRun, extra: dict) -> Path:
    """Once ``prompts/candidates.jsonl`` is complete (one run, or shards merged): the filters,
    the output files, the manifest's counts and the stage marked complete."""
    settings, layout = config.generate_prompts, config.layout
    seeds = load_seeds(config)
    candidates = read_jsonl(layout.prompt_candidates)
    kept, counts = apply_filters(config, candidates, seeds)
    if settings.feedback_filter:
        kept, counts["feedback_rejected"] = feedback_filter(config, run, kept)
    else:  # left by an earlier run with the filter on: not this output's
        layout.prompt_feedback.unlink(missing_ok=True)
        forget(layout.prompt_feedback)
    generated = sum(record["asked"] for record in candidates)
    refuse_empty(generated, kept, counts)
    used = {i for record in kept for i in record["seed_ids"]}
    mixed = []
    if settings.mix_seeds:
        rng = random.Random(f"{config.seed}:generate-prompts:mix")
        count = min(round(len(kept) * settings.mix_seeds), len(seeds))
        mixed = [{"id": p.id, "prompt": p.text, "seed_ids": [], "request": None}
                 for p in rng.sample(seeds, count)]
    used |= {record["id"] for record in mixed}
    write_jsonl_atomic(layout.prompt_seeds, [{"id": p.id, "prompt": p.text} for p in seeds
                                             if p.id in used])
    write_jsonl_atomic(layout.generated_prompts, kept + mixed)
    run.manifest.counts.update({"seeds": len(seeds), "requests": len(candidates),
                                "generated": generated, "kept": len(kept), **counts,
                                "seeds_mixed_in": len(mixed),
                                "generated_tokens": extra["generated_tokens"]})
    run.complete()
    ui.info(f"generate-prompts: {len(kept)} new prompts of {generated} generated (dropped: "
            f"{said(counts) or 'none'}) -> {layout.generated_prompts}\n  look at them with: "
            f"cai inspect {ui.shell(layout.generated_prompts)}")
    return layout.generated_prompts


# The settings that decide each filter's drops, for the message when nothing is kept.
LOOSEN = {"too_short": ("min_chars",), "too_long": ("max_chars",),
          "unreadable": ("min_readable", "min_words"), "near_duplicates": ("max_overlap",),
          "feedback_rejected": ("feedback_threshold",)}


def said(counts: dict[str, int]) -> str:
    """What the filters dropped, in words: "3 too short, 1 duplicates" ("" for nothing)."""
    return ", ".join(f"{count} {name.replace('_', ' ')}" for name, count in counts.items() if count)


def refuse_empty(generated: int, kept: list[dict], counts: dict[str, int]) -> None:
    """``NothingMade`` when none of the ``generated`` prompts asked for is kept: every request
    outgrew the policy model's context, or the filters dropped every prompt."""
    if kept or not generated:
        return
    if counts["overflow"] >= generated:
        raise NothingMade(
            f"generate-prompts: all {generated} prompts asked for were skipped, no request "
            "fitting the policy model's context; lower generate_prompts.sampling.max_new_tokens "
            "(or generate_prompts.few_shot), or raise models.policy.max_context if the model "
            "reads longer inputs, then rerun")
    keys = [f"generate_prompts.{key}" for name, count in counts.items() if count
            for key in LOOSEN.get(name, ())]
    loosen = f"loosen {', '.join(keys)}, or " if keys else ""
    raise NothingMade(
        f"generate-prompts: none of the {generated} prompts asked for passed the filters "
        f"(dropped: {said(counts)}); {loosen}generate with a stronger models.policy, then rerun "
        "(with only the filters changed, it filters the same replies again)")


class GeneratePrompts(RecordStage):
    command = "generate-prompts"
    parts = ("candidates.jsonl",)

    def spec(self, config: Config) -> StageSpec:
        return stage_spec(config)

    def preflight(self, config: Config) -> None:
        from cai_cli.engines.models import check_model_source

        check_model_source(config.models.policy, "models.policy")
        if config.generate_prompts.feedback_filter:
            check_model_source(config.feedback_model, "models.feedback")

    def output(self, config: Config) -> Path:
        return config.layout.generated_prompts

    def items(self, config: Config, *, force: bool) -> list[tuple[int, int]]:
        load_seeds(config)
        self.preflight(config)
        return requests(config)

    def produce(self, config: Config, run: StageRun, items: list, out: dict[str, Path], *,
                force: bool, whole: bool) -> dict:
        """The replies to the requests ``items`` into ``candidates.jsonl`` (or a shard's part).

        --force on output of this config redoes it all, the feedback answers too; replacing the
        output of another config (--force, or cai run) keeps what that change leaves valid: the
        candidates (when only the filters changed) and the feedback answers each have a
        fingerprint of what decides them, kept with the finished file."""
        redo = force and run.spec.state() != "stale"
        if redo:  # the filters (after the merge, for shards) ask the feedback questions again
            forget(config.layout.prompt_feedback)
        settings = config.generate_prompts
        writer = checkpointed(
            run, out["candidates.jsonl"], checkpoint_batches(items, settings.prompts_per_checkpoint),
            make_requests(config, load_seeds(config)), label="generate-prompts",
            engine=(config.models.policy, "models.policy"), size=lambda batch: 1,
            fingerprint=generation_fingerprint(run.spec) if whole else None,
            fresh=redo if whole else force, keep=whole, timing="generation_seconds")
        return {"generated_tokens": writer.extra.get("tokens", 0)}

    def finish(self, config: Config, run: StageRun, extra: dict) -> Path:
        return finish_stage(config, run, extra)

    def work(self, config: Config, ctx) -> Work:
        settings = config.generate_prompts
        source = seed_source(config)
        seeds = ctx.prompts("generate_prompts.seeds" if settings.seeds else "data.red_team",
                            lambda: load_seeds(config), source, source.limit)
        model, key = config.models.policy, "models.policy"
        fmt = resolve_format(settings.prompt_format, ctx.tokens(model, key),
                             "generate_prompts.prompt_format")
        todo = requests(config)
        calls: list = []
        for batch in checkpoint_batches(todo, settings.prompts_per_checkpoint):
            for _, prompts, params in request_calls(config, seeds, batch, fmt):
                calls.append(Generate(key, model, prompts, [0] * len(prompts),
                                      params.max_new_tokens))
        questions = 0
        if settings.feedback_filter:
            # Every new prompt asked for (at most: the filters before it drop some), each at most
            # as long as the reply it came from.
            feedback = config.feedback_model
            fmt = resolve_format(config.label_prefs.prompt_format,
                                 ctx.tokens(feedback, config.feedback_key), "label_prefs.prompt_format")
            bound = settings.sampling.max_new_tokens
            asks = [classification_prompt("", None, settings.feedback_question, yes_first, fmt)
                    for yes_first in (True, False)]  # both orders of the options
            for start in range(0, settings.num_prompts, settings.prompts_per_checkpoint):
                rows = min(settings.prompts_per_checkpoint, settings.num_prompts - start)
                calls.append(Score(config.feedback_key, feedback, asks * rows, [bound] * 2 * rows,
                                   OPTIONS, at_most=True))
                questions += 2 * rows
        return Work(calls, counts={"seeds": len(seeds), "requests": len(todo),
                                   "prompts_asked": settings.num_prompts,
                                   "feedback_passes": questions},
                    notes=["new prompts at most num_prompts: the filters drop some"])
