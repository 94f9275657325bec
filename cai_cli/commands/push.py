"""``--push-to-hub REPO_ID``: upload a finished training stage's model, the only way anything
leaves the machine. A config cannot ask for it (``trl_args.push_to_hub`` is refused), so a
shared config never publishes someone's model with their token.

The upload holds the model files only: the manifest (local paths, timings), logs, plots and
hidden files (checkpoints, progress) stay home. A LoRA adapter saved alone names its base model;
one on a local model gets a warning, as the upload alone does not load.
"""

from __future__ import annotations

from cai_cli import ui
from cai_cli.config import Config
from cai_cli.engines.models import is_local_model, recorded_base
from cai_cli.errors import UserError


def push_stage(config: Config, stage, repo_id: str) -> None:
    """Upload the finished ``<run_dir>/<stage>`` to the hub repository ``repo_id`` (created
    private if it does not exist), with the token of the environment."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from cai_cli.stages.common import Need, require_complete

    command = stage.command
    directory = require_complete(config, Need(stage, "only a finished model is uploaded"))
    base = recorded_base(directory)
    if base is not None and is_local_model(base):
        ui.warn(f"{command}: {directory} is a LoRA adapter on the local model {base}, which the "
                "upload does not hold: load it with that model at hand, or upload the base too and "
                "set base_model_name_or_path in the uploaded adapter_config.json, or rerun with "
                f"{command.replace('-', '_')}.lora.merge: true to upload full weights")
    api = HfApi()
    try:
        api.create_repo(repo_id, private=True, exist_ok=True)
        api.upload_folder(folder_path=str(directory), repo_id=repo_id,
                          ignore_patterns=["manifest.json", ".*", ".*/**", "logs/**", "plots/**"],
                          commit_message=f"cai {command}")
    except (HfHubHTTPError, OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"--push-to-hub {repo_id}: the upload failed ({first}); the model is "
                        f"complete in {directory}: rerun with --push-to-hub once the hub is "
                        "reachable and HF_TOKEN is set") from None
    ui.info(f"{command}: uploaded {directory} to https://huggingface.co/{repo_id}")
