"""Any OpenAI-compatible server (``backend: openai``): ``vllm serve``, SGLang, TGI, llama.cpp's
server, or a hosted API.

- **Requests.** A conversation goes to chat completions, a plain string (transcript format) to
  completions. A conversation that ends in a begun assistant turn (the judge's "The answer is:
  (") is sent with ``continue_final_message`` (vLLM, SGLang), so the server continues that turn.
  Each prompt is one request with its own ``seed``, so its text does not depend on the others;
  ``max_concurrency`` of them are in flight at once.
- **Failures.** The ``openai`` client retries a request that could not connect, timed out or
  got HTTP 408, 409, 429 or 5xx, ``max_retries`` times with exponential backoff (0.5 s doubling
  up to 8 s, with jitter). After that, or on any other HTTP error, the stage stops with a
  ``UserError`` naming the server's URL (exit 2); its finished batches are kept, so rerunning
  the command once the server is back resumes where it stopped. The server is asked for its
  models when the engine starts, so an unreachable server or a wrong model name fails before
  anything is written.
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
import os
import re
from typing import Sequence

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
                return [card async for card in client.models.list()]

        try:
            cards = self._run(ask())
        except UserError as exc:
            if "HTTP 404" not in str(exc):
                raise
            return 0  # a server without the models route: nothing to check
        served = {card.id: card for card in cards}
        if self.name not in served:
            names = ", ".join(sorted(served)[:10]) or "none"
            raise UserError(f"{self.what}.name_or_path: the server at {self.url} has no model "
                            f"'{self.name}' (it serves: {names}); use one of those names")
        length = (served[self.name].model_extra or {}).get("max_model_len")
        return int(length) if isinstance(length, int) else 0

    def _run(self, work):
        """Run a coroutine; the client's errors, once its retries are spent, become UserErrors
        that name the server."""
        openai = self._openai
        try:
            return asyncio.run(work)
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
        {token text: logprob} or None)``; an ``Overflow`` when it does not fit."""
        stops = list(params.stop[:MAX_STOPS]) or None
        extra = {"top_k": params.top_k} if params.top_k else {}
        common = dict(model=self.name, max_tokens=params.max_new_tokens, seed=seed,
                      temperature=params.temperature, top_p=params.top_p, stop=stops)
        try:
            if isinstance(prompt, str):
                response = await client.completions.create(
                    prompt=prompt, logprobs=logprobs or None, extra_body=extra or None, **common)
                choice = response.choices[0]
                text = choice.text
                first = None
                if logprobs and choice.logprobs is not None and choice.logprobs.top_logprobs:
                    first = dict(choice.logprobs.top_logprobs[0])
            else:
                if prompt[-1]["role"] == "assistant":
                    extra.update(continue_final_message=True, add_generation_prompt=False)
                response = await client.chat.completions.create(
                    messages=prompt, extra_body=extra or None,
                    **({"logprobs": True, "top_logprobs": logprobs} if logprobs else {}),
                    **common)
                choice = response.choices[0]
                text = choice.message.content or ""
                first = None
                content = getattr(choice.logprobs, "content", None) if choice.logprobs else None
                if logprobs and content:
                    first = {alt.token: alt.logprob for alt in content[0].top_logprobs}
        except self._openai.BadRequestError as exc:
            overflow = self._overflow(str(exc), params.max_new_tokens)
            if overflow is None:
                raise
            return overflow
        usage = response.usage
        prompt_tokens = usage.prompt_tokens if usage else 0
        if self.max_context and prompt_tokens + params.max_new_tokens > self.max_context:
            # the server shortens such an answer silently; the other engines skip the prompt
            return Overflow(prompt_tokens, params.max_new_tokens, self.max_context)
        tokens = usage.completion_tokens if usage else 0
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
                self.on_tokens(reply[1])
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


def _reason(exc: Exception) -> str:
    """The first line of an error, without the client's boilerplate."""
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    cause = exc.__cause__
    if cause is not None and str(cause) and message in ("Connection error.", "Request timed out."):
        message = f"{message.rstrip('.')}: {str(cause).splitlines()[0]}"
    return message.strip().splitlines()[0][:300]
