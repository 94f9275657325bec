"""Any OpenAI-compatible server (``backend: openai``): ``vllm serve``, SGLang, TGI, llama.cpp's
server, or a hosted API.

- **Requests.** A conversation goes to chat completions, a plain string (transcript format) to
  completions. A conversation that ends in a begun assistant turn (the judge's "The answer is:
  (") is sent with ``continue_final_message`` (vLLM, SGLang), so the server continues that turn.
  Each prompt is one request with its own ``seed``, so its text does not depend on the others;
  ``max_concurrency`` of them are in flight at once.
- **Failures.** The ``openai`` client retries a request that could not connect, timed out or
  got HTTP 408, 409, 429 or 5xx, ``max_retries`` times with exponential backoff (0.5 s doubling
  up to 8 s, with jitter). A reply that is not an OpenAI one although the status says all is
  well (a web page, ``"choices": []``, ``"message": null``: a proxy, a login page, a server
  having a bad moment) is retried the same way here (``BadReply``). After that, or on any other
  HTTP error, the stage stops with a ``UserError`` naming the server's URL and what it answered
  (exit 2); its finished batches are kept, so rerunning the command once the server is back
  resumes where it stopped. The server is asked for its models when the engine starts, so an
  unreachable server or a wrong model name fails before anything is written.
- **Context.** vLLM reports the model's context (``max_model_len``); a prompt that leaves less
  room than ``max_new_tokens`` is an ``Overflow`` (skipped with a warning), as the other
  engines do, instead of the server's silently shortened answer.
- **Option probabilities** come from ``top_logprobs`` of one generated token. A server that
  returns none raises ``NoLogprobs`` and the judge falls back to sampled verdicts.
- **The API key** is read from the environment variable ``api_key_env`` names, handed to the
  client and kept nowhere else: not in this object, a message, a manifest or the config.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
from typing import Any, Sequence

from cai_cli import ui
from cai_cli.engines.base import Completion, NoLogprobs, Overflow, PromptInput, SamplingParams
from cai_cli.engines.hf import cut_at_stop
from cai_cli.config import OpenAIModelConfig
from cai_cli.errors import UserError
from cai_cli.run.seeding import record_seed

# OpenAI's API takes at most four stop strings; any further ones are cut here, after the answer.
MAX_STOPS = 4
_CONTEXT = re.compile(r"maximum context length (?:is )?\(?(\d+)")
_PROMPT = re.compile(r"(?:contains (?:at least )?|resulted in |Input length \(|request has )(\d+)")
SHOWN = 200  # characters of a bad reply shown in the error


class BadReply(Exception):
    """An HTTP 200 whose body is not the OpenAI reply it should be."""

    def __init__(self, route: str, problem: str, body: str):
        super().__init__(f"{route}: {problem}")
        self.route, self.problem, self.body = route, problem, body


class OpenAIBackend:
    def __init__(self, model: OpenAIModelConfig, what: str):
        try:
            import openai
        except ImportError:
            raise UserError(f"{what}.backend: openai needs the openai package: "
                            "`pip install openai`") from None
        self._openai = openai
        self.config, self.what, self.name = model, what, model.name_or_path
        self.url = model.base_url.rstrip("/")
        self.has_chat_template = True  # the server renders conversations with its template
        self.on_tokens = None
        self.closed = False
        self.has_logprobs: bool | None = None  # unknown until the first score_options
        self.bounded = 0  # options read as "at most the last alternative" (see score_options)
        key = None
        if model.api_key_env:
            key = os.environ.get(model.api_key_env)
            if not key:
                raise UserError(f"{what}.api_key_env: the environment variable "
                                f"{model.api_key_env} is not set; export the server's API key "
                                "in it (it is read from there only)")
        # The client is built for each call (its connections belong to that call's event loop);
        # this closure is the only place that keeps the key.
        self._client = lambda: openai.AsyncOpenAI(
            base_url=self.url, api_key=key or "no-key", timeout=model.timeout,
            max_retries=model.max_retries)
        self.max_context = model.max_context or self._check_server()

    # -- lifecycle

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> "OpenAIBackend":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _check_server(self) -> int:
        """Ask the server for its models: it must answer and serve ours. Returns the model's
        context when the server says it (vLLM's ``max_model_len``), else 0 (unknown)."""
        async def ask():
            async with self._client() as client:
                return await self._retrying(lambda: self._models(client))

        try:
            cards = self._run(ask())
        except UserError as exc:
            if "HTTP 404" not in str(exc):
                raise
            return 0  # a server without the models route: nothing to check
        served = {card["id"]: card for card in cards}
        if self.name not in served:
            names = ", ".join(sorted(served)[:10]) or "none"
            raise UserError(f"{self.what}.name_or_path: the server at {self.url} has no model "
                            f"'{self.name}' (it serves: {names}); use one of those names")
        length = served[self.name].get("max_model_len")
        return length if isinstance(length, int) and not isinstance(length, bool) else 0

    async def _models(self, client) -> list[dict]:
        """The model cards of ``/models``: ``{"data": [{"id": ...}, ...]}``."""
        raw = await client.models.with_raw_response.list()
        reply = _json_reply(raw, "/models")
        cards = reply.get("data")
        if not isinstance(cards, list) or not all(
                isinstance(c, dict) and isinstance(c.get("id"), str) for c in cards):
            raise BadReply("/models", "no list of models with an id each", raw.http_response.text)
        return cards

    async def _retrying(self, call):
        """``await call()``, again after a ``BadReply``, ``max_retries`` times with the
        client's own backoff (0.5 s doubling up to 8 s, less up to a quarter of jitter)."""
        for attempt in range(self.config.max_retries + 1):
            try:
                return await call()
            except BadReply:
                if attempt == self.config.max_retries:
                    raise
                await asyncio.sleep(min(0.5 * 2 ** attempt, 8.0) * (1 - 0.25 * random.random()))

    def _run(self, work):
        """Run a coroutine; the client's errors, once its retries are spent, become UserErrors
        that name the server."""
        openai = self._openai
        try:
            return asyncio.run(work)
        except BadReply as exc:
            body = exc.body.strip()
            shown = (f"{body[:SHOWN]!r}" + (f" (the first {SHOWN} of {len(body)} characters)"
                                            if len(body) > SHOWN else "")) if body else "nothing"
            raise UserError(
                f"{self.what}: the server at {self.url} answered {exc.route} with HTTP 200 but "
                f"not an OpenAI reply ({exc.problem}), after {self.config.max_retries} retries; "
                f"it sent: {shown}. Check that {self.what}.base_url is an OpenAI-compatible "
                "API root (it ends in /v1), then rerun the same command: the stage resumes "
                "where it stopped") from None
        except openai.APIConnectionError as exc:  # includes timeouts
            kind = "timed out" if isinstance(exc, openai.APITimeoutError) else "cannot connect"
            raise UserError(
                f"{self.what}: {kind}: the server at {self.url} ({_reason(exc)}), after "
                f"{self.config.max_retries} retries; start it or fix {self.what}.base_url, then "
                "rerun the same command: the stage resumes where it stopped") from None
        except openai.APIStatusError as exc:
            status = exc.status_code
            hint = {401: f"check the key in the variable {self.what}.api_key_env names",
                    403: f"check the key in the variable {self.what}.api_key_env names",
                    404: f"check {self.what}.name_or_path and {self.what}.base_url",
                    429: f"lower {self.what}.max_concurrency or raise {self.what}.max_retries",
                    }.get(status, "rerun the same command once it works: the stage resumes "
                                  "where it stopped")
            retried = (f", after {self.config.max_retries} retries"
                       if status in (408, 409, 429) or status >= 500 else "")
            raise UserError(f"{self.what}: the server at {self.url} answered HTTP {status} "
                            f"({_reason(exc)}){retried}; {hint}") from None

    def _require_open(self) -> None:
        if self.closed:
            raise RuntimeError(f"the backend of '{self.name}' is closed")

    async def _gather(self, make) -> list:
        """``make(client, i)`` for every request i, ``max_concurrency`` at a time, in order;
        the first failure cancels the rest."""
        limit = asyncio.Semaphore(self.config.max_concurrency)
        async with self._client() as client:
            async def one(call):
                async with limit:
                    return await call(client)

            tasks = [asyncio.ensure_future(one(call)) for call in make]
            try:
                return await asyncio.gather(*tasks)
            except BaseException:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise

    async def _request(self, client, prompt: PromptInput, params: SamplingParams, seed: int,
                       logprobs: int = 0):
        """One completion of ``prompt``: ``(text, new tokens, the first token's alternatives as
        {token text: logprob} or None)``; an ``Overflow`` when it does not fit. A reply that is
        not an OpenAI one is asked for again (``_retrying``)."""
        return await self._retrying(
            lambda: self._request_once(client, prompt, params, seed, logprobs))

    async def _request_once(self, client, prompt: PromptInput, params: SamplingParams, seed: int,
                            logprobs: int):
        stops = list(params.stop[:MAX_STOPS]) or None
        extra = {"top_k": params.top_k} if params.top_k else {}
        common = dict(model=self.name, max_tokens=params.max_new_tokens, seed=seed,
                      temperature=params.temperature, top_p=params.top_p, stop=stops)
        try:
            if isinstance(prompt, str):
                route = "/completions"
                raw = await client.completions.with_raw_response.create(
                    prompt=prompt, logprobs=logprobs or None, extra_body=extra or None, **common)
            else:
                route = "/chat/completions"
                if prompt[-1]["role"] == "assistant":
                    extra.update(continue_final_message=True, add_generation_prompt=False)
                raw = await client.chat.completions.with_raw_response.create(
                    messages=prompt, extra_body=extra or None,
                    **({"logprobs": True, "top_logprobs": logprobs} if logprobs else {}),
                    **common)
        except self._openai.BadRequestError as exc:
            overflow = self._overflow(str(exc), params.max_new_tokens)
            if overflow is None:
                raise
            return overflow
        reply = _json_reply(raw, route)
        try:
            text, first = _read_choice(reply, chat=route == "/chat/completions",
                                       logprobs=bool(logprobs))
            usage = reply.get("usage") or {}
            prompt_tokens = _count(usage.get("prompt_tokens"))
            tokens = _count(usage.get("completion_tokens"))
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise BadReply(route, _problem(exc), raw.http_response.text) from None
        if self.max_context and prompt_tokens + params.max_new_tokens > self.max_context:
            # the server shortens such an answer silently; the other engines skip the prompt
            return Overflow(prompt_tokens, params.max_new_tokens, self.max_context)
        return cut_at_stop(text, params.stop).strip(), tokens, first

    def _overflow(self, message: str, max_new_tokens: int) -> Overflow | None:
        """The server's "prompt too long" refusal as an ``Overflow``; None for other errors."""
        context = _CONTEXT.search(message)
        if context is None:
            return None
        prompt = _PROMPT.search(message)
        tokens = int(prompt.group(1)) if prompt else 0
        return Overflow(tokens, max_new_tokens, int(context.group(1)))

    # -- the protocol

    def generate(self, prompts: Sequence[PromptInput], params: SamplingParams,
                 seeds: Sequence[int] | None = None) -> list[Completion | Overflow]:
        self._require_open()
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        if seeds is None:
            seeds = [record_seed(params.seed, index) for index in range(len(prompts))]
        # OpenAI's API takes seeds below 2**63; vLLM's below 2**64: ours are below 2**63.
        async def reported(client, prompt, seed):
            reply = await self._request(client, prompt, params, seed)
            if self.on_tokens is not None and not isinstance(reply, Overflow):
                self.on_tokens(reply[1], 1)
            return reply

        calls = [lambda client, p=p, s=s: reported(client, p, s) for p, s in zip(prompts, seeds)]
        replies = self._run(self._gather(calls))
        return [r if isinstance(r, Overflow) else Completion(r[0], r[1]) for r in replies]

    def score_options(self, prompts: Sequence[PromptInput],
                      options: Sequence[str]) -> list[list[float] | Overflow]:
        """The log-probability of each option as the first token the server generates after
        the prompt, read from its ``top_logprobs`` alternatives: the token that is the option
        itself ("A", not " A"), as the other engines read it. An option that is not among them
        has at most the least likely alternative's probability: that bound is used, with a
        warning, and counted in ``bounded`` (raise ``top_logprobs``, if the server allows, to
        read it). ``NoLogprobs`` when the server returns none."""
        self._require_open()
        if self.has_logprobs is False:
            raise NoLogprobs(f"the server at {self.url} returns no log-probabilities")
        params = SamplingParams(max_new_tokens=1, temperature=0.0)
        k = self.config.top_logprobs
        calls = [lambda client, p=p: self._request(client, p, params, 0, logprobs=k)
                 for p in prompts]
        replies = self._run(self._gather(calls))
        results: list[list[float] | Overflow] = []
        bounded = 0
        for reply in replies:
            if isinstance(reply, Overflow):
                results.append(reply)
                continue
            alternatives = reply[2]
            if not alternatives:
                self.has_logprobs = False
                raise NoLogprobs(f"the server at {self.url} returns no log-probabilities")
            self.has_logprobs = True
            floor = min(alternatives.values())
            scores = []
            for option in options:
                if option in alternatives:
                    scores.append(alternatives[option])
                else:
                    scores.append(floor)
                    bounded += 1
            results.append(scores)
        if bounded:
            self.bounded += bounded
            ui.warn(f"{bounded} option(s) not among the server's {k} most likely next tokens "
                    f"at {self.url}: read as at most the least likely of them (raise "
                    f"{self.what}.top_logprobs if the server allows more)")
        return results


def _json_reply(raw, route: str) -> dict:
    """The JSON object of an HTTP 200 reply; ``BadReply`` when it is not one."""
    body = raw.http_response.text
    try:
        reply = json.loads(body)
    except ValueError:
        raise BadReply(route, "not JSON", body) from None
    if not isinstance(reply, dict):
        raise BadReply(route, f"JSON {type(reply).__name__}, not an object", body)
    return reply


def _read_choice(reply: dict, *, chat: bool, logprobs: bool) -> tuple[str, dict | None]:
    """The first choice's text and, when asked for, its first token's alternatives. Raises
    (KeyError, TypeError, ...) where the reply lacks what an OpenAI reply has."""
    choices = reply["choices"]
    if not isinstance(choices, list) or not choices:
        raise ValueError("no choices")
    choice = choices[0]
    if chat:
        message = choice["message"]
        if not isinstance(message, dict):
            raise ValueError(f"choices[0].message is {json.dumps(message)}")
        text = message.get("content") or ""  # null content: an empty answer (a refusal, say)
    else:
        text = choice["text"]
    if not isinstance(text, str):
        raise ValueError(f"the text of choices[0] is {json.dumps(text)}")
    first = None
    found: Any = choice.get("logprobs")
    if logprobs and found:
        if chat:
            content = found.get("content")
            if content:
                first = {alt["token"]: float(alt["logprob"]) for alt in content[0]["top_logprobs"]}
        elif found.get("top_logprobs"):
            first = {token: float(value) for token, value in found["top_logprobs"][0].items()}
    return text, first


def _count(value: Any) -> int:
    """A token count from ``usage``: 0 when the server does not say."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _problem(exc: Exception) -> str:
    """What a reply lacked, from the error reading it raised."""
    if isinstance(exc, KeyError):
        return f"no {exc.args[0]!r}"
    if isinstance(exc, IndexError):
        return "an empty list"
    return str(exc) or type(exc).__name__


def _reason(exc: Exception) -> str:
    """The first line of an error, without the client's boilerplate."""
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    cause = exc.__cause__
    if cause is not None and str(cause) and message in ("Connection error.", "Request timed out."):
        message = f"{message.rstrip('.')}: {str(cause).splitlines()[0]}"
    return message.strip().splitlines()[0][:300]
