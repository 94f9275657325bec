"""No secret in any message: the values of ``HF_TOKEN`` and of every variable a config's
``api_key_env`` names are scrubbed from errors, warnings and tracebacks, wherever their text came
from (a server's echo is in test_engines.py)."""

from __future__ import annotations

from pathlib import Path

import yaml

from helpers import cai_main

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_SECRETabcdefghijklmnop"
KEY = "sk-SECRET-0123456789"


def config(tmp_path: Path, name: str, **changes) -> Path:
    data = {"run_dir": str(tmp_path / "run"), "constitution": str(ROOT / "constitutions" / "harmless.yaml"),
            "data": {"red_team": {"path": str(ROOT / "cai_cli" / "resources" / "red_team_prompts.jsonl")}},
            "models": {"policy": {"name_or_path": "some/model"}}}
    data.update(changes)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_hf_token_is_scrubbed_from_warnings_and_errors(tmp_path):
    # A config whose file name and prompt path happen to hold the token: the rename warning
    # names the file, the error the path.
    path = config(tmp_path, f"{TOKEN}.yaml",
                  data={"red_team": {"path": f"/nowhere/{TOKEN}.jsonl"}},
                  generate_sl={"batch_size": 4})
    result = cai_main("config", "validate", "--config", path, env={"HF_TOKEN": TOKEN})
    assert result.returncode == 2
    assert "warning:" in result.stderr and "error:" in result.stderr
    assert TOKEN not in result.stdout + result.stderr
    assert "/nowhere/***.jsonl" in result.stderr


def test_the_key_a_config_names_is_scrubbed_even_when_the_config_is_invalid(tmp_path):
    path = config(tmp_path, "c.yaml", models={"policy": {
        "backend": "openai", "model": "m", "api_key_env": "MY_JUDGE_KEY", "max_concurrency": KEY}})
    result = cai_main("config", "show", "--config", path, env={"MY_JUDGE_KEY": KEY})
    assert result.returncode == 2 and "max_concurrency" in result.stderr
    assert KEY not in result.stderr and "***" in result.stderr


def test_an_internal_failure_prints_its_traceback_scrubbed(monkeypatch):
    from cai_cli import cli

    def broken():
        raise RuntimeError(f"request failed with Authorization: Bearer {KEY[:10]}, token {TOKEN}")

    monkeypatch.setattr(cli, "app", broken)
    result = cai_main("status", env={"HF_TOKEN": TOKEN})
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "RuntimeError" in result.stderr
    assert TOKEN not in result.stderr and KEY[:10] not in result.stderr
    assert "Bearer ***, token ***" in result.stderr
