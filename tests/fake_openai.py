"""A small OpenAI-compatible server that is not vLLM, for the engine tests: its answers and its
preferences are known in advance, and it can be told to fail.

- Generation (chat or completions): the text ``answer N`` with N = seed mod 1000, so each
  record's text follows from its seed alone.
- Judging (a conversation whose last turn is the begun "The answer is: ("): it prefers the
  option whose ``answer N`` has the smaller N (or the shorter option, ``prefer=shorter``, or the
  longer one, ``prefer=longer``: two judges of opposite tastes), with probability
  ``PREFERENCE`` in its log-probabilities, or names that letter when it gives no
  log-probabilities.
- ``fail_status`` / ``fail_times``: answer that HTTP status to the next completion requests;
  ``die_after``: stop listening after that many completion requests (a server that dies
  mid-run); ``api_key``: refuse requests without it (HTTP 401).
- ``nonsense`` / ``nonsense_times``: answer HTTP 200 with a reply that is not an OpenAI one to
  the next completion requests (after ``nonsense_after`` good ones): ``html`` (a web page),
  ``no_choices`` (``"choices": []``), ``null_message`` (``"message": null``);
  ``models_html``: ``/v1/models`` answers a web page.
- ``echo_authorization``: refuse completion requests with HTTP 400 whose message quotes the
  request's ``Authorization`` header (as some proxies do).

It listens on 127.0.0.1 only, serves at most ``MAX_REQUESTS`` requests, and stops when the
test's fixture stops it.
"""

from __future__ import annotations

import json
import math
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PREFERENCE = 0.8
MAX_REQUESTS = 5000
MODEL = "fake-judge"
OPTION = re.compile(r"\(A\) (.*?)\n\(B\) (.*)", re.S)
NUMBER = re.compile(r"answer (\d+)")
# What a web server that is not an OpenAI API answers: a login page, say.
PAGE = "<!DOCTYPE html><html><head><title>Sign in</title></head><body>" + "x" * 300 + "</body></html>"


def number(text: str) -> int:
    found = NUMBER.search(text)
    return int(found.group(1)) if found else 10**6


def smaller_number(a: str, b: str) -> str:
    """The default preference: the option whose ``answer N`` has the smaller N."""
    return "A" if number(a) <= number(b) else "B"


def shorter(a: str, b: str) -> str:
    """A preference any answer has: the shorter option (A on equal lengths)."""
    return "A" if len(a) <= len(b) else "B"


def longer(a: str, b: str) -> str:
    """The opposite taste: the longer option (B on equal lengths, so that with the options in
    both orders a tie still averages to 0.5)."""
    return "A" if len(a) > len(b) else "B"


def preferred(user_text: str, prefer=smaller_number) -> str:
    """The letter of the option this server prefers."""
    found = OPTION.search(user_text)
    if found is None:
        return "A"
    return prefer(*found.groups())


class FakeServer:
    def __init__(self, port: int = 0, *, logprobs: bool = True, api_key: str | None = None,
                 fail_status: int = 0, fail_times: int = 0, die_after: int | None = None,
                 prefer=smaller_number, nonsense: str | None = None, nonsense_times: int = 0,
                 nonsense_after: int = 0, models_html: bool = False,
                 echo_authorization: bool = False):
        self.logprobs, self.api_key, self.prefer = logprobs, api_key, prefer
        self.fail_status, self.fail_times, self.die_after = fail_status, fail_times, die_after
        self.nonsense, self.nonsense_times, self.nonsense_after = (nonsense, nonsense_times,
                                                                   nonsense_after)
        self.models_html, self.echo_authorization = models_html, echo_authorization
        self.completions = 0  # completion requests answered or refused
        self.requests = 0
        self.authorizations: set[str] = set()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.handle(self, None)

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                server.handle(self, json.loads(self.rfile.read(length) or b"{}"))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "FakeServer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # -- requests

    def handle(self, handler, body) -> None:
        with self.lock:
            self.requests += 1
            if self.requests > MAX_REQUESTS:
                return self.reply(handler, 503, {"error": {"message": "request budget spent"}})
            self.authorizations.add(handler.headers.get("Authorization", ""))
        if self.api_key and handler.headers.get("Authorization") != f"Bearer {self.api_key}":
            return self.reply(handler, 401, {"error": {"message": "invalid API key"}})
        path = handler.path.rstrip("/")
        if path.endswith("/models") and self.models_html:
            return self.reply_raw(handler, 200, PAGE, "text/html")
        if path.endswith("/models"):
            return self.reply(handler, 200, {"object": "list", "data": [
                {"id": MODEL, "object": "model", "owned_by": "tests"}]})
        if not path.endswith("/completions"):
            return self.reply(handler, 404, {"error": {"message": f"no route {path}"}})
        with self.lock:
            self.completions += 1
            count = self.completions
            failing = self.fail_times > 0
            self.fail_times -= failing
            lying = count > self.nonsense_after and self.nonsense_times > 0 and \
                self.nonsense is not None and not failing
            self.nonsense_times -= lying
        if self.die_after is not None and count > self.die_after:
            threading.Thread(target=self.stop, daemon=True).start()
            handler.close_connection = True
            return  # no answer: the connection closes, the port stops listening
        if failing:
            return self.reply(handler, self.fail_status, {"error": {"message": "try later"}})
        if self.echo_authorization:
            return self.reply(handler, 400, {"error": {"message": "bad request from "
                                                       + handler.headers.get("Authorization", "")}})
        if lying:
            return self.lie(handler, body, chat=path.endswith("chat/completions"))
        if body.get("model") != MODEL:
            return self.reply(handler, 404, {"error": {
                "message": f"The model `{body.get('model')}` does not exist."}})
        self.reply(handler, 200, self.completion(body, chat=path.endswith("chat/completions")))

    def completion(self, body: dict, chat: bool) -> dict:
        messages = body.get("messages") or [{"role": "user", "content": body.get("prompt", "")}]
        judging = messages[-1]["role"] == "assistant" and \
            messages[-1]["content"].endswith("The answer is: (")
        if judging:
            letter = preferred(messages[-2]["content"], self.prefer)
            text = f"{letter})"
        else:
            text = f"answer {int(body.get('seed') or 0) % 1000}"
        logprobs = None
        if judging and self.logprobs and (body.get("logprobs") or body.get("top_logprobs")):
            other = "B" if letter == "A" else "A"
            top = [{"token": letter, "logprob": math.log(PREFERENCE), "bytes": None},
                   {"token": other, "logprob": math.log(1 - PREFERENCE - 0.05), "bytes": None},
                   {"token": "C", "logprob": math.log(0.05), "bytes": None}]
            logprobs = {"content": [{**top[0], "top_logprobs": top}]}
        usage = {"prompt_tokens": sum(len(m["content"]) for m in messages) // 4,
                 "completion_tokens": 2, "total_tokens": 0}
        if chat:
            choice = {"index": 0, "finish_reason": "stop", "logprobs": logprobs,
                      "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "finish_reason": "stop", "text": text, "logprobs": None}
        return {"id": "fake", "object": "chat.completion" if chat else "text_completion",
                "created": 0, "model": MODEL, "choices": [choice], "usage": usage}

    def lie(self, handler, body: dict, chat: bool) -> None:
        """An HTTP 200 whose body is not an OpenAI reply (``nonsense`` says which)."""
        if self.nonsense == "html":
            return self.reply_raw(handler, 200, PAGE, "text/html")
        reply = self.completion(body, chat)
        if self.nonsense == "no_choices":
            reply["choices"] = []
        elif self.nonsense == "null_message":
            reply["choices"][0]["message" if chat else "text"] = None
        else:
            raise ValueError(f"unknown nonsense {self.nonsense!r}")
        self.reply(handler, 200, reply)

    @staticmethod
    def reply(handler, status: int, payload: dict) -> None:
        FakeServer.reply_raw(handler, status, json.dumps(payload), "application/json")

    @staticmethod
    def reply_raw(handler, status: int, text: str, content_type: str) -> None:
        data = text.encode()
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        try:
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up on this request (it cancels the rest after a failure)
