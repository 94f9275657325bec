"""The loop every generating stage runs: records made batch by batch into a resumable JSONL file.

    writer = checkpointed(run, path, batches, make, engine=(model, "models.policy"), label=...)

opens ``path`` through ``ResumableJsonl`` (an interrupted run resumes after its last whole
batch), and unless a previous run finished it: loads the engine, records that the stage is
producing (not before: a model that fails to load leaves the directory as it was), calls
``make(backend, batch, step)`` for each batch left and appends the records it returns, with a
progress bar, then closes the engine, lets the stage ``check`` what it made (raising
``NothingMade`` when every item was skipped) and moves the file into place. ``step`` lets
``make`` keep running totals in the saved state (``step.extra``), place the bar within the
batch and set its rate column.

The bar counts the batches' items (``size``) and moves within a batch as the engine works:
with ``completions_per_item`` (the completions one item takes: answers to sample, turns of a
chain) and ``tokens_per_item`` (the most tokens they can take), it stands at whichever is
further, the finished completions' share or the generated tokens' share. So it moves per token
on an engine that decodes a batch in steps (hf) and per finished completion on a server
(openai), where each request's tokens come only when it finishes, and one well below
``max_new_tokens`` would move a token-counting bar by a sliver. The rate column shows tokens a
second; the bar is set exactly after each batch.

No heavy imports here.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

from rich.progress import TextColumn

from cai_cli import ui
from cai_cli.config import AnyModelConfig
from cai_cli.run.artifacts import ResumableJsonl
from cai_cli.stages.common import StageRun

Engine = tuple[AnyModelConfig, str]  # a model config and the config key that names it


class Step:
    """What ``make`` may use while it works on a batch."""

    def __init__(self, bar, task, writer: ResumableJsonl, before: float, size: float,
                 loop: "_Loop"):
        self._bar, self._task, self._before, self._size = bar, task, before, size
        self._loop = loop
        self._moved = 0.0
        self._tokens = self._finished = 0  # this batch's, as the engine reports them
        self.extra: dict[str, Any] = dict(writer.extra)  # running totals, saved with each batch

    def rate(self, text: str) -> None:
        """The bar's rate column, e.g. ``12.5 comparisons/s``."""
        self._bar.update(self._task, rate=text)

    def at(self, fraction: float) -> None:
        """Put the bar at ``fraction`` of this batch (e.g. after each of its engine calls)."""
        self._moved = min(max(fraction, 0.0), 1.0) * self._size
        self._bar.update(self._task, completed=self._before + self._moved)

    def stream(self, tokens: int, finished: int = 0) -> None:
        """Tokens the engine just generated and completions it just finished: the bar moves to
        the further of their shares of the batch (never back, never past its end), and the rate
        column shows tokens a second."""
        loop = self._loop
        loop.tokens += tokens
        self._tokens += tokens
        self._finished += finished
        shares = [self._tokens / loop.tokens_per_item if loop.tokens_per_item else 0.0,
                  self._finished / loop.completions_per_item if loop.completions_per_item else 0.0]
        self._moved = min(max(self._moved, *shares), self._size)
        rate = loop.tokens / max(time.perf_counter() - loop.started, 1e-9)
        self._bar.update(self._task, completed=self._before + self._moved,
                         rate=f"{rate:,.0f} tok/s")

    @property
    def seconds(self) -> float:
        """Since the loop started (in this process)."""
        return time.perf_counter() - self._loop.started


class _Loop:
    def __init__(self, tokens_per_item: int | None, completions_per_item: int | None):
        self.started, self.tokens = time.perf_counter(), 0
        self.tokens_per_item, self.completions_per_item = tokens_per_item, completions_per_item


def checkpointed(run: StageRun, path: Path, batches: Sequence[list], make: Callable, *,
                 label: str | Callable[[list], str],
                 engine: Engine | Callable[[list], Engine] | None,
                 fingerprint: str | None = None, fresh: bool = False, keep: bool = False,
                 size: Callable[[list], int] = len, tokens_per_item: int | None = None,
                 completions_per_item: int | None = None, timing: str | None = None,
                 resuming: str | None = None,
                 check: Callable[[ResumableJsonl], None] | None = None) -> ResumableJsonl:
    """Make the records of ``batches`` into ``path`` (see the module's docstring) and return
    the finished writer (its ``records()``, its saved ``extra``).

    ``label``: the bar's description, or a function of the batch giving it. ``engine``: the
    model that ``make`` gets as its backend, or a function of the batch giving
    it (a new model is loaded when it changes), or None (``make`` gets None). ``fingerprint``:
    what decides the file (default: the stage's). ``fresh``: start over. ``keep``: keep the
    file's progress state after the stage completes (its fingerprint, for a later run to reuse
    the file). ``timing``: a manifest timing to record the loop's seconds under. ``resuming``:
    what to name in a line saying how far a resumed run had got (e.g. "the judging").
    ``check``: called with the writer once every batch is made, before the file moves into
    place: a stage raises ``NothingMade`` there when it made no record at all, so an earlier
    complete output is not replaced by an empty one."""
    writer = ResumableJsonl(path, fingerprint or run.spec.fingerprint)
    done = writer.open(fresh=fresh)
    if done and resuming and not writer.finished and done < len(batches):
        ui.info(f"{run.spec.command}: resuming {resuming} after {done} of {len(batches)} "
                "checkpoints")
    if not writer.finished:
        from cai_cli.engines import load_backend

        loop = _Loop(tokens_per_item, completions_per_item)
        backend, loaded = None, None
        total = sum(size(b) for b in batches)
        completed = sum(size(b) for b in batches[:done])
        with ui.progress(TextColumn("{task.fields[rate]}")) as bar:
            first = label if isinstance(label, str) else \
                label(batches[min(done, len(batches) - 1)]) if batches else ""
            task = bar.add_task(first, total=total, rate="", completed=completed)
            for batch in batches[done:]:
                if not isinstance(label, str):
                    bar.update(task, description=label(batch))
                wanted = engine(batch) if callable(engine) else engine
                if wanted is not None and wanted != loaded:
                    if backend is not None:
                        backend.close()
                    backend, loaded = load_backend(*wanted), wanted
                run.producing()
                step = Step(bar, task, writer, completed, size(batch), loop)
                if backend is not None:
                    backend.on_tokens = step.stream
                records = make(backend, batch, step)
                writer.append_batch(records, **step.extra)
                completed += size(batch)
                bar.update(task, completed=completed)
        if backend is not None:
            backend.close()
        if timing:
            run.manifest.timings[timing] = round(time.perf_counter() - loop.started, 2)
        if check is not None:
            check(writer)
        writer.finish()
    if not keep:
        run.after_complete(writer.cleanup)
    return writer
