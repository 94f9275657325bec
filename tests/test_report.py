"""``cai report``: one Markdown page with every completed stage's figures, plots (drawn when
missing), example chains and pairs, judge-check's and the evaluation's tables; stages not run
are said to be so; no torch."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from fake_run import finished_run
from helpers import ENV, ROOT, cai

LINK = re.compile(r"!\[[^\]]*\]\(([^)]+)\)")


@pytest.fixture(autouse=True)
def drawing(monkeypatch):
    monkeypatch.setitem(ENV, "CAI_PLOTS", "1")  # the suite turns plots off elsewhere


def links(page: Path) -> list[Path]:
    return [page.parent / target for target in LINK.findall(page.read_text())]


def test_report_of_a_finished_run(tmp_path):
    config, run = finished_run(tmp_path)
    result = cai("report", "--config", config)
    assert result.returncode == 0, result.stderr
    page = run / "report.md"
    text = page.read_text()
    for heading in ("## generate-sl", "## finetune", "## label-prefs", "## train-rm",
                    "## optimize", "## evaluate", "## judge-check"):
        assert heading in text
    assert "Not run" not in text
    # the plots, drawn by the report (none were there), linked relative to the page
    images = links(page)
    assert len(images) == 11 and all(path.is_file() for path in images)
    assert all(not Path(target).is_absolute() for target in LINK.findall(text))
    # example chains with their critiques and revisions; model text cannot break the page
    assert "Critique 0: the answer helps break in." in text
    assert "Revision 0: call a locksmith instead." in text
    assert "<script>" not in text.replace("\\<script>", "") and "\\<script>" in text
    assert "\\|" in text and "\\*rake\\*" in text
    # and it reads as written in a plain-text viewer: no HTML entities where none are needed
    assert "the pins -> open & in." in text and "&gt;" not in text and "&amp;" not in text
    # the most confident pairs with p_chosen and their judgments
    assert "`pair4`: p_chosen 0.900" in text and "| privacy | AB | 0.500 |" in text
    # judge-check and the evaluation: tables with intervals, and the verdict
    assert "| agreement (95% Wilson interval; 0.50 is chance) | 0.70 [0.40, 0.89] | 10 |" in text
    assert "| sft | base | 0.600 | [0.500, 0.700] | 20 |" in text
    assert "| base | sft |" not in text  # each pair once, the later model over the earlier
    assert "Over-refusal on the benign prompts" in text
    assert "policy is more harmless than base and no less helpful" in text
    # the judge's caveats come with the verdict, at the top and in the evaluation's section
    assert text.count("the judge is undecided on the yes/no questions") == 2


def test_missing_stages_are_said_plainly_and_output_elsewhere(tmp_path):
    config, run = finished_run(tmp_path, stages=("generate-sl", "label-prefs"),
                               new_report=False)
    out = tmp_path / "shared" / "page.md"
    out.parent.mkdir()
    result = cai("report", "--config", config, "--output", out)
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    for command in ("finetune", "train-rm", "optimize", "evaluate", "judge-check"):
        section = text.split(f"## {command}", 1)[1].split("\n## ", 1)[0]
        assert "Not run" in section, command
    assert "## label-prefs" in text
    images = links(out)
    assert images and all(path.is_file() for path in images)  # ../run/prefs/plots/...


def test_an_old_evaluation_report_still_reads(tmp_path):
    """eval/report.json without harmful-compliance, helpfulness or a verdict."""
    config, run = finished_run(tmp_path, stages=("evaluate",), new_report=False)
    assert cai("report", "--config", config).returncode == 0
    text = (run / "report.md").read_text()
    assert "### Harmlessness" in text and "Helpfulness" not in text
    assert "eval/plots/win_rates.png" in text and "/rates.png)" not in text


def test_a_jury_s_evaluation_shows_each_judge_and_the_pooled_figures(tmp_path):
    """Several judges: who they are (the feedback model named as such, judge-check's mark), the
    jury's row first, then each judge's, and plots of both."""
    config, run = finished_run(tmp_path, stages=("evaluate",), jury=True)
    assert cai("report", "--config", config).returncode == 0
    text = (run / "report.md").read_text()
    assert "judged by 2 judges" in text and "mean of their probabilities" in text
    assert "| `feedback` | `tiny/model` | hf | yes (the feedback model) | 0.50 [0.24, 0.76], " \
        "not above chance |" in text
    assert "| `big/judge` | `big/judge` | openai, http://judge.example/v1 | no |  |" in text
    assert text.index("| sft | base | jury | 0.600 |") < \
        text.index("| sft | base | feedback | 0.600 |") < \
        text.index("| sft | base | big/judge | 0.400 | [0.300, 0.500] |")
    assert "| policy | big/judge | 0.200 |" in text  # rates per judge too
    assert "learned the feedback model's preference" in text.split("## Stages")[0]
    images = links(run / "report.md")
    assert [path.name for path in images] == ["win_rates.png", "rates.png", "per_principle.png"]


def test_a_run_directory_that_does_not_exist(tmp_path):
    config, run = finished_run(tmp_path, stages=())
    result = cai("report", "--config", config, "--set", f"run_dir={tmp_path / 'nowhere'}")
    assert result.returncode == 2
    assert "nowhere: no such directory" in result.stderr and "Traceback" not in result.stderr


def test_report_imports_no_torch(tmp_path):
    config, run = finished_run(tmp_path)
    code = ("import sys\n"
            "from cai_cli.cli import main\n"
            f"sys.argv = ['cai', 'report', '--config', {str(config)!r}]\n"
            "try:\n    main()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
            "print([m for m in ('torch', 'transformers', 'trl', 'datasets') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=ENV, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert (run / "report.md").is_file()
