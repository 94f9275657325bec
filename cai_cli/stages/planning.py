"""What the stages will do, before they run: the context each stage's ``work`` reads.

``WorkContext(config, running)`` gives ``Stage.work`` what it needs to describe its engine calls
(``engines.work``) without loading a model or running an earlier stage:

- ``tokens(model, key)``: the model's tokenizer and chat template (``engines.tokens``), so the
  prompts are rendered as the engine will render them; a checkpoint this run makes (``sft/``,
  ``rm/``, ``policy/``) is read as its base model;
- ``prompts(...)``: a prompt source, with stand-ins for a dataset that is not on this machine
  and for generate-prompts' output when it is not made yet;
- ``output(command)``: what an earlier stage's work will produce (its prompts, its pairs), for
  a stage that reads it and that output is not there yet;
- ``runs(command)`` / ``complete(command)``: which stages will run in this plan, which are done.

``cai plan`` prices the calls (``commands.plan``); the tests run each stage and compare the calls
it made with its ``work``. No heavy imports here (a tokenizer is loaded when asked for).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from cai_cli.config import Config
from cai_cli.errors import UserError
from cai_cli.run.artifacts import load_manifest


class WorkContext:
    def __init__(self, config: Config, running: set[str], *, prompt_tokens: int = 60):
        self.config, self.running = config, running
        self.prompt_tokens = prompt_tokens  # a prompt of a dataset that cannot be read here
        self.notes: list[str] = []  # what the stand-ins assume, once each
        self.unread: dict[str, list[str]] = {}  # dataset not here -> "N (stage)"
        self.counters: dict[str, Any] = {}
        self.works: dict[str, Any] = {}
        self.stage = ""  # the stage whose work is being described

    # Stages ------------------------------------------------------------------------------------

    def runs(self, command: str) -> bool:
        return command in self.running

    def complete(self, command: str) -> bool:
        manifest = load_manifest(self.config.layout.stage_dir(command))
        return bool(manifest and manifest.get("status") == "complete")

    def work(self, command: str):
        """The work of stage ``command`` (described once)."""
        if command not in self.works:
            from cai_cli.stages.pipeline import STAGES

            outer, self.stage = self.stage, command
            try:
                self.works[command] = STAGES[command].work(self.config, self)
            finally:
                self.stage = outer
        return self.works[command]

    def output(self, command: str) -> dict:
        """What stage ``command``'s work will produce (``Work.outputs``)."""
        return self.work(command).outputs

    def note(self, line: str) -> None:
        if line not in self.notes:
            self.notes.append(line)

    # Models ------------------------------------------------------------------------------------

    def base_of(self, path: str) -> str:
        """A checkpoint this run makes (<run_dir>/sft, rm, policy) has its base model's size and
        tokenizer; anything else is itself."""
        from cai_cli.stages import training

        config, layout = self.config, self.config.layout
        resolved = Path(path).expanduser()
        if resolved == layout.sft:
            return training.model_for(config, config.finetune.model, "")[0].name_or_path
        if resolved == layout.rm:
            return training.model_for(config, config.train_rm.model, "")[0].name_or_path
        if resolved == layout.policy:
            return self.base_of(config.optimize.model or str(layout.sft))
        return path

    def tokens(self, model, key: str):
        """A token counter for ``model`` (``engines.tokens``): its tokenizer where it is on this
        machine; for a server's model, the policy's tokenizer as the best guess; else about four
        characters a token (each said once in the notes)."""
        from cai_cli.engines.tokens import token_counter

        name = self.base_of(model.name_or_path)
        counter = token_counter(name, getattr(model, "revision", None), key, self.counters)
        if counter.approximate:
            policy = self.base_of(self.config.models.policy.name_or_path)
            other = token_counter(policy, None, key, self.counters)
            if not other.approximate:
                self.note(f"tokens of {name}: counted with {policy}'s tokenizer (its own is not "
                          "here)")
                return other
            self.note(f"tokens of {name}: about 4 characters a token (no tokenizer here)")
        return counter

    # Data --------------------------------------------------------------------------------------

    def prompts(self, what: str, load: Callable[[], list], source, limit: int | None) -> list:
        """Prompts from ``load()``; a dataset that is not on this machine: ``limit`` prompts of
        ``prompt_tokens`` words (stand-ins with distinct ids)."""
        from cai_cli.data.sources import Prompt

        if self.generated(source):
            return self.generated_stand_ins(what, limit)
        try:
            return load()
        except UserError as exc:
            if source is None or source.dataset is None or "cannot load" not in str(exc):
                raise
        if not limit:
            raise UserError(f"{what}: plan cannot read '{source.dataset}' here (not in the local "
                            f"cache) and {what}.limit is not set, so it cannot count the prompts; "
                            "set a limit, or download the dataset once")
        counts = self.unread.setdefault(f"{what}: '{source.dataset}'", [])
        if f"{limit:,} ({self.stage})" not in counts:
            counts.append(f"{limit:,} ({self.stage})")
        text = " ".join(["word"] * self.prompt_tokens)
        return [Prompt(f"{what}-{i}", f"{text} {i}") for i in range(limit)]

    def dataset(self, what: str, load: Callable[[], Any], source, assumed: str) -> Any:
        """``load()``, or None when it reads a dataset that is not on this machine (the note
        says what is ``assumed`` instead)."""
        try:
            return load()
        except UserError as exc:
            if source is None or source.dataset is None or "cannot load" not in str(exc):
                raise
        self.note(f"{what}: '{source.dataset}' is not on this machine: {assumed}")
        return None

    def generated(self, source) -> bool:
        """Whether ``source`` names generate-prompts' output and that output is not there yet
        (or will be made again): its prompts are then what that stage will make."""
        layout = self.config.layout
        path = getattr(source, "path", None)
        if path is None or Path(path).expanduser().resolve() != layout.generated_prompts.resolve():
            return False
        return self.runs("generate-prompts") or not layout.generated_prompts.is_file()

    def generated_stand_ins(self, what: str, limit: int | None) -> list:
        """The prompts generate-prompts will write, at most: ``num_prompts`` new ones (and the
        seeds ``mix_seeds`` mixes in), as long as the seed prompts (cycled), up to ``limit``."""
        from cai_cli.data.sources import Prompt
        from cai_cli.stages.generate_prompts import load_seeds, seed_source

        settings = self.config.generate_prompts
        source = seed_source(self.config)
        seeds = self.prompts("generate_prompts.seeds" if settings.seeds else "data.red_team",
                             lambda: load_seeds(self.config), source, source.limit)
        total = settings.num_prompts + min(round(settings.num_prompts * settings.mix_seeds),
                                           len(seeds))
        count = min(limit, total) if limit else total
        self.note(f"{what}: generate-prompts' output, not made yet: {settings.num_prompts} new "
                  "prompts at most (before its filters), each as long as a seed prompt")
        return [Prompt(f"generated-{i}", seeds[i % len(seeds)].text) for i in range(count)]
