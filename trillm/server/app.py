"""The OpenAI-compatible HTTP API (FastAPI): chat and text completions, streamed as server-sent events or
whole, the model list, health, tokenization and Prometheus metrics, with llama-server's and OpenAI's field
names and error shapes ({"error": {"message", "type", "code"}}). Generation itself is the scheduler's
(scheduler.py); a handler turns a request into sequences, then the sequences' events into responses."""

import asyncio
import contextlib
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from importlib import resources
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from trillm.chat import message_text, render_chat
from trillm.engine import Sampling
from trillm.errors import TrillmError
from trillm.harmony import REASONING_EFFORTS
from trillm.server.scheduler import HarmonyReply, QueueFull, Scheduler, Sequence, TextReply

log = logging.getLogger("trillm.server")

MAX_BODY_BYTES = 8 * 2**20  # a request's JSON body; a longer one is refused unread (413)
MAX_CHOICES = 8  # `n`: completions one request may ask for
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1000  # each is matched against the reply's tail at every token
RETRY_AFTER_SECONDS = "1"


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "code"}} with this HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.headers = status, message, kind, code, headers


def error_response(status: int, message: str, kind: str, code: str | None = None, headers=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": code}}, status, headers=headers)


# ---- Requests -----------------------------------------------------------------------------------------

class SamplingFields(BaseModel):
    """What both completion endpoints take. Unknown fields are ignored, as OpenAI's clients send many."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, lt=1)
    repeat_penalty: float | None = Field(None, gt=0, allow_inf_nan=False)  # llama-server's name
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-2**63, lt=2**63 - MAX_CHOICES)  # torch's generator takes 64 bits
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: dict | None = None
    ignore_eos: bool = False  # llama-server's: generate max_tokens whatever the model says

    def sampling(self, choice: int) -> Sampling:
        if self.presence_penalty or self.frequency_penalty:
            raise APIError(400, "presence_penalty and frequency_penalty are not supported (use repeat_penalty)")
        defaults = Sampling()
        seed = None if self.seed is None else self.seed + choice  # n choices: n different draws
        return Sampling(temperature=pick(self.temperature, defaults.temperature), top_k=pick(self.top_k, defaults.top_k),
                        top_p=pick(self.top_p, defaults.top_p), min_p=pick(self.min_p, defaults.min_p),
                        repetition_penalty=pick(self.repeat_penalty, 1.0), seed=seed)

    def stop_strings(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOP_STRINGS or any(len(text) > MAX_STOP_CHARS for text in stop):
            raise APIError(400, f"at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_CHARS} characters",
                           code="invalid_stop")
        return [text for text in stop if text]

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


async def parse(request: Request, schema: type[BaseModel]):
    """The body as `schema`, whatever its Content-Type says (curl -d sends a form's): malformed JSON or a
    field of the wrong type or range is a 400 naming it."""
    body = await request.body()
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise APIError(400, f"the body is not valid JSON: {error}", code="invalid_json") from None
    try:
        return schema.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        raise APIError(400, f"{where or 'body'}: {first.get('msg')}", code="invalid_value") from None


def pick(value, default):
    return default if value is None else value


class ChatRequest(SamplingFields):
    messages: list[dict] = Field(min_length=1)
    reasoning_effort: Literal[REASONING_EFFORTS] | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int]


class TokenizeRequest(BaseModel):
    content: str
    add_special: bool = False
    with_pieces: bool = False


class DetokenizeRequest(BaseModel):
    tokens: list[int]


# ---- The server's state ---------------------------------------------------------------------------------

class Server:
    """The model (loaded on a thread after the server starts listening, so /health can say 503 meanwhile),
    its scheduler, and the settings the handlers check."""

    def __init__(self, load_model: Callable, parallel: int, queue_size: int, api_key: str | None = None,
                 alias: str | None = None, on_load_failure: Callable[[str], None] | None = None,
                 threads: int | None = None):
        self.load_model, self.parallel, self.queue_size, self.threads = load_model, parallel, queue_size, threads
        self.api_key, self.alias, self.on_load_failure = api_key, alias, on_load_failure
        self.model = self.scheduler = None
        self.model_id = alias
        self.load_error: str | None = None
        self.created = int(time.time())

    def load(self):
        try:
            model = self.load_model()
            model.require_tokenizer()
            scheduler = Scheduler(model, self.parallel, self.queue_size, self.threads)
        except Exception as error:  # noqa: BLE001 - any failure is told in one line, not a traceback
            self.load_error = str(error) if isinstance(error, TrillmError) else \
                f"internal error (a bug in trillm): {type(error).__name__}: {error}"
            if self.on_load_failure:
                self.on_load_failure(self.load_error)
            else:
                log.error("trillm: error: %s", self.load_error)
            return
        self.model_id = self.alias or Path(model.source).name
        scheduler.start()
        self.model, self.scheduler = model, scheduler

    def ready(self):
        if self.model is None:
            if self.load_error:
                raise APIError(500, f"the model failed to load: {self.load_error}", "server_error")
            raise APIError(503, "the model is loading", "unavailable_error", headers={"Retry-After": RETRY_AFTER_SECONDS})
        return self.model

    def check_model(self, name: str | None):
        if name and name != self.model_id:
            raise APIError(404, f"the model {name!r} does not exist here; this server runs {self.model_id!r}",
                           code="model_not_found")


# ---- Prompts --------------------------------------------------------------------------------------------

def chat_prompt(model, request: ChatRequest) -> list[int]:
    tools = request.tools if request.tool_choice != "none" else None
    if request.tool_choice not in (None, "auto", "none"):
        raise APIError(400, "tool_choice may be \"auto\" or \"none\" (forcing a call is not supported)")
    effort = request.reasoning_effort or "medium"
    if model.config.chat_format == "harmony":
        return model.harmony.render(request.messages, effort, tools)
    if tools:
        raise APIError(400, "tools are supported for gpt-oss (harmony) models only")
    messages = []
    for index, message in enumerate(request.messages):
        if not isinstance(message.get("role"), str):
            raise APIError(400, f"messages[{index}]: each message must have a string role")
        messages.append({**message, "content": message_text(message, f"messages[{index}]", required=False)})
    tokenizer = model.require_tokenizer()
    text = render_chat(tokenizer.chat_template, messages, add_generation_prompt=True,
                       bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
    return model.encode_prompt(text, add_special_tokens=False)


def completion_prompt(model, request: CompletionRequest) -> list[int]:
    prompt = request.prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        outside = [i for i in prompt if not 0 <= i < model.config.vocab_size]
        if outside:
            raise APIError(400, f"token id {outside[0]} is outside the vocabulary of {model.config.vocab_size}")
        return list(prompt)
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise APIError(400, "prompt must be one string (or a list holding one), or a list of token ids")
        prompt = prompt[0]
    return model.encode_prompt(prompt)


def token_budget(model, request: SamplingFields, prompt_ids: list[int]) -> int:
    """max_tokens as asked, refused when the prompt and it cannot fit in the context; else what is left."""
    if not prompt_ids:
        raise APIError(400, "the prompt is empty")
    room = model.max_context - len(prompt_ids)
    if room <= 0:
        raise APIError(400, f"the prompt is {len(prompt_ids)} tokens, longer than the context of "
                            f"{model.max_context} tokens", code="context_length_exceeded")
    asked = pick(request.max_completion_tokens, request.max_tokens)
    if asked is not None and asked > room:
        raise APIError(400, f"max_tokens {asked} and the prompt's {len(prompt_ids)} tokens are more than the "
                            f"context of {model.max_context} tokens", code="context_length_exceeded")
    return room if asked is None else asked


# ---- Runs: a request's sequences and their events --------------------------------------------------------

class Run:
    """The n sequences of one request, their events gathered on the handler's event loop."""

    def __init__(self, server: Server, model, request: SamplingFields, prompt_ids: list[int], harmony: bool):
        self.events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        max_tokens = token_budget(model, request, prompt_ids)
        stop = request.stop_strings()
        self.sequences = []
        for choice in range(request.n):
            reply = HarmonyReply(model.harmony, model.tokenizer, stop) if harmony else TextReply(model.tokenizer, stop)
            send = (lambda event, choice=choice: loop.call_soon_threadsafe(self.events.put_nowait, (choice, event)))
            try:
                sampling = request.sampling(choice)
            except TrillmError as error:
                raise APIError(400, str(error)) from None
            self.sequences.append(Sequence(prompt_ids, max_tokens, sampling, reply, send, request.ignore_eos))
        self.prompt_tokens = len(prompt_ids)
        try:
            server.scheduler.submit(self.sequences)
        except QueueFull as error:
            raise APIError(503, str(error), "unavailable_error", headers={"Retry-After": RETRY_AFTER_SECONDS}) from None

    async def __aiter__(self) -> AsyncIterator[tuple[int, tuple]]:
        """(choice, event) until every sequence ended; a handler that stops listening cancels the rest."""
        running = len(self.sequences)
        try:
            while running:
                choice, event = await self.events.get()
                if event[0] != "delta":
                    running -= 1
                yield choice, event
        finally:
            self.cancel()

    def cancel(self):
        for sequence in self.sequences:
            sequence.cancelled = True  # its slot is freed at the next step


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def tool_call_list(calls: list[tuple[str, str]]) -> list[dict]:
    return [{"index": i, "id": f"call_{secrets.token_hex(12)}", "type": "function",
             "function": {"name": name, "arguments": arguments}} for i, (name, arguments) in enumerate(calls)]


def chat_delta(delta: dict) -> dict:
    """A scheduler delta in chat's fields: reasoning under both names clients read (llama.cpp's and
    DeepSeek's reasoning_content, vLLM's and ollama's reasoning)."""
    out = {}
    if "content" in delta:
        out["content"] = delta["content"]
    if "reasoning" in delta:
        out["reasoning_content"] = out["reasoning"] = delta["reasoning"]
    return out


async def gone(request: Request):
    """Returns once the client has closed its connection (looked at twice a second)."""
    while not await request.is_disconnected():
        await asyncio.sleep(0.5)


async def collect(run: Run, request: Request) -> tuple[list[dict], int]:
    """Every choice's text, reasoning, tool calls and finish reason; (choices, completion tokens). A client
    that disconnects while it waits cancels the run."""
    choices = [{"content": "", "reasoning": "", "finish_reason": None, "tool_calls": []} for _ in run.sequences]
    generated = 0
    events = run.__aiter__()
    watcher = asyncio.ensure_future(gone(request))
    try:
        while True:
            waiting = asyncio.ensure_future(events.__anext__())
            await asyncio.wait([waiting, watcher], return_when=asyncio.FIRST_COMPLETED)
            if not waiting.done():  # the client left: the run is cancelled as its events close
                waiting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiting
                raise APIError(499, "the client closed the request")
            try:
                choice, event = waiting.result()
            except StopAsyncIteration:
                break
            if event[0] == "delta":
                for field in ("content", "reasoning"):
                    choices[choice][field] += event[1].get(field, "")
            elif event[0] == "error":
                raise APIError(500, event[1], "server_error")
            else:
                _, reason, calls, _, completion_tokens = event
                choices[choice].update(finish_reason=reason, tool_calls=calls)
                generated += completion_tokens
    finally:
        watcher.cancel()
        await events.aclose()
    return choices, generated


def sse(payload) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False) if not isinstance(payload, str) else payload}\n\n"


# ---- The app --------------------------------------------------------------------------------------------

def create_app(server: Server) -> FastAPI:
    """The ASGI app for this server; the model loads when the app starts."""

    async def lifespan(app):
        threading.Thread(target=server.load, name="trillm-load", daemon=True).start()
        yield

    app = FastAPI(title="trillm", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    if server.api_key:
        app.add_middleware(ApiKey, key=server.api_key)

    @app.exception_handler(APIError)
    async def api_error(request, error: APIError):
        return error_response(error.status, error.message, error.kind, error.code, error.headers)

    @app.exception_handler(TrillmError)
    async def trillm_error(request, error: TrillmError):
        return error_response(400, str(error), "invalid_request_error")

    @app.exception_handler(HTTPException)
    async def http_error(request, error: HTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return error_response(error.status_code, str(error.detail), kind)

    @app.exception_handler(Exception)
    async def internal_error(request, error: Exception):
        log.exception("trillm: internal error")
        return error_response(500, f"internal error (a bug in trillm): {type(error).__name__}: {error}", "server_error")

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return resources.files("trillm.server").joinpath("page.html").read_text()

    @app.get("/health")
    async def health():
        server.ready()
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        model = server.ready()
        return {"object": "list", "data": [{
            "id": server.model_id, "object": "model", "created": server.created, "owned_by": "trillm",
            "meta": {"chat_format": model.config.chat_format or "template", "context_length": model.max_context,
                     "vocab_size": model.config.vocab_size, "parallel": server.parallel}}]}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await parse(request, TokenizeRequest)
        tokenizer = server.ready().require_tokenizer()
        ids = await asyncio.to_thread(tokenizer.encode, body.content, add_special_tokens=body.add_special)
        if not body.with_pieces:
            return {"tokens": ids}
        return {"tokens": [{"id": i, "piece": tokenizer.decode([i], skip_special_tokens=False)} for i in ids]}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await parse(request, DetokenizeRequest)
        model = server.ready()
        outside = [i for i in body.tokens if not 0 <= i < model.config.vocab_size]
        if outside:
            raise APIError(400, f"token id {outside[0]} is outside the vocabulary of {model.config.vocab_size}")
        return {"content": model.require_tokenizer().decode(body.tokens, skip_special_tokens=False)}

    @app.get("/metrics")
    async def metrics():
        server.ready()
        return Response(generate_latest(server.scheduler.metrics.registry),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await parse(request, ChatRequest)
        model = server.ready()
        server.check_model(body.model)
        harmony = model.config.chat_format == "harmony"
        # Rendering and tokenizing run beside the event loop, which keeps streaming the other replies meanwhile.
        run = Run(server, model, body, await asyncio.to_thread(chat_prompt, model, body), harmony)
        identity = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": server.model_id}
        if body.stream:
            return StreamingResponse(chat_stream(run, identity, body.include_usage()), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        choices, generated = await collect(run, request)
        return {**identity, "object": "chat.completion", "usage": usage(run.prompt_tokens, generated), "choices": [
            {"index": i, "finish_reason": c["finish_reason"], "logprobs": None, "message": {
                "role": "assistant", "content": c["content"],
                **({"reasoning_content": c["reasoning"], "reasoning": c["reasoning"]} if harmony else {}),
                **({"tool_calls": tool_call_list(c["tool_calls"])} if c["tool_calls"] else {})}}
            for i, c in enumerate(choices)]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await parse(request, CompletionRequest)
        model = server.ready()
        server.check_model(body.model)
        run = Run(server, model, body, await asyncio.to_thread(completion_prompt, model, body), harmony=False)
        identity = {"id": f"cmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": server.model_id}
        if body.stream:
            return StreamingResponse(completion_stream(run, identity, body.include_usage()),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        choices, generated = await collect(run, request)
        return {**identity, "object": "text_completion", "usage": usage(run.prompt_tokens, generated), "choices": [
            {"index": i, "text": c["content"], "finish_reason": c["finish_reason"], "logprobs": None}
            for i, c in enumerate(choices)]}

    return app


async def choice_events(run: Run, chunk: dict, include_usage: bool, opening: list[dict], delta_choice,
                        finish_choice) -> AsyncIterator[str]:
    """The events of both streams: the `opening` choices, then each choice's deltas and finish as
    `delta_choice(delta)` and `finish_choice(reason, tool_calls)` give their fields, usage if asked, then
    [DONE]. An error mid-stream is sent as an error event."""
    for choice in opening:
        yield sse({**chunk, "choices": [choice]})
    generated = 0
    async for choice, event in run:
        if event[0] == "delta":
            yield sse({**chunk, "choices": [{"index": choice, **delta_choice(event[1])}]})
        elif event[0] == "error":
            yield sse({"error": {"message": event[1], "type": "server_error", "code": None}})
            return
        else:
            _, reason, calls, _, completion_tokens = event
            generated += completion_tokens
            yield sse({**chunk, "choices": [{"index": choice, **finish_choice(reason, calls)}]})
    if include_usage:
        yield sse({**chunk, "choices": [], "usage": usage(run.prompt_tokens, generated)})
    yield sse("[DONE]")


def chat_stream(run: Run, identity: dict, include_usage: bool) -> AsyncIterator[str]:
    """chat.completion.chunk events: the role first, then content and reasoning deltas, and each choice's
    finish reason (tool calls with it)."""
    roles = [{"index": choice, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
             for choice in range(len(run.sequences))]
    return choice_events(run, {**identity, "object": "chat.completion.chunk"}, include_usage, roles,
                         lambda delta: {"delta": chat_delta(delta), "finish_reason": None},
                         lambda reason, calls: {"delta": {"tool_calls": tool_call_list(calls)} if calls else {},
                                                "finish_reason": reason})


def completion_stream(run: Run, identity: dict, include_usage: bool) -> AsyncIterator[str]:
    """text_completion events: text deltas, then each choice's finish reason."""
    return choice_events(run, {**identity, "object": "text_completion"}, include_usage, [],
                         lambda delta: {"text": delta.get("content", ""), "finish_reason": None, "logprobs": None},
                         lambda reason, calls: {"text": "", "finish_reason": reason, "logprobs": None})


class ApiKey:
    """ASGI middleware: every path but the page and /health needs `Authorization: Bearer KEY` (401 without).
    Plain ASGI, not Starlette's BaseHTTPMiddleware, under which a handler cannot see its client leave."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in ("/", "/health"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                response = error_response(401, "missing or invalid API key (send Authorization: Bearer KEY)",
                                          "authentication_error", "invalid_api_key")
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is answered 413 without being read whole (by its
    Content-Length, or as it arrives when it has none)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = error_response(413, f"the request body is over {self.limit // 2**20} MB", "invalid_request_error",
                                   "body_too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await too_large(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise HTTPException(413, f"the request body is over {self.limit // 2**20} MB")
            return message

        await self.app(scope, limited_receive, send)
