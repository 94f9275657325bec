"""``cai init DIR``: a starter config, the constitution and sample prompts, from the package, so a
user who installed cai (not from a clone) has something to run and edit (as torchtune's ``tune
cp`` or litgpt's config hub do)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from cai_cli import ui
from cai_cli.errors import UserError

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
# file written -> where it comes from in the package's resources
FILES = {
    "config.yaml": "starter.yaml",
    "constitution.yaml": "constitutions/harmless.yaml",
    "red_team_prompts.jsonl": "red_team_prompts.jsonl",
    "helpful.jsonl": "helpful.jsonl",
}


def write_starter(directory: Path, model: str = DEFAULT_MODEL, force: bool = False) -> None:
    """Write ``FILES`` into ``directory`` (created if needed); never over a file that exists
    unless ``force``."""
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{directory} is a file; give a directory to write the starter files to")
    existing = [name for name in FILES if (directory / name).exists()]
    if existing and not force:
        raise UserError(f"{directory} already has {', '.join(existing)}; pass --force to "
                        "overwrite, or choose another directory")
    directory.mkdir(parents=True, exist_ok=True)
    package = resources.files("cai_cli") / "resources"
    for name, source in FILES.items():
        text = (package / source).read_text(encoding="utf-8")
        if name == "config.yaml":
            # paths as the user gave the directory: relative ones work from where cai init ran
            text = text.replace("<DIR>", directory.as_posix()).replace("<MODEL>", model)
        (directory / name).write_text(text, encoding="utf-8")
    config = directory / "config.yaml"
    ui.stdout.print(f"wrote {', '.join(FILES)} to {directory}", markup=False, soft_wrap=True)
    ui.stdout.print("next:", markup=False)
    for command in (f"cai config validate --config {ui.shell(config)}",
                    f"cai run --config {ui.shell(config)}",
                    f"cai inspect {ui.shell(directory.as_posix() + '/runs/cai')}"):
        ui.stdout.print(f"  {command}", markup=False, soft_wrap=True)
