"""The HTTP side of ``pldr serve``: a FastAPI app in the shape of OpenAI's completions API.

Endpoints: ``GET /v1/models``, ``POST /v1/completions`` (streamed as server-sent events or not),
``GET /health`` and ``GET /metrics`` (Prometheus text). Every error answers OpenAI's JSON shape
``{"error": {"message", "type", "param", "code"}}``. The app talks to the ``Scheduler`` thread through
its ``submit`` and per-request asyncio queues, fed through one ``Mailbox`` (one wake-up of the event
loop per batch of events, not one per token). A stream sends what has arrived since its last chunk as
one chunk per choice, at most every ``STREAM_INTERVAL_S``, so a busy server sends fewer, longer chunks.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from pldr_core.prompts import encode_prompt
from pldr_core.sampling import Sampler
from pldr_core.serve.scheduler import Event, Job, Scheduler

MAX_LOGPROBS = 5
# A stream sends at most one chunk per choice this often (the first at once): on a busy server each
# send is a system call and a trip through the event loop, which a chunk of several tokens shares.
STREAM_INTERVAL_S = 0.02
MAX_STOPS = 4


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def _error_response(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """The body of ``POST /v1/completions``; ``top_k`` is an extension. Types are checked strictly."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False
    logprobs: int | None = None
    n: int = 1
    best_of: int | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    suffix: str | None = None
    user: str | None = None


class Mailbox:
    """Events from the scheduler thread to the requests' queues on the event loop, delivered in batches:
    the loop is woken once for whatever was posted since its last delivery."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._posted: list[tuple[asyncio.Queue, Event]] = []

    def post(self, queue: asyncio.Queue, event: Event) -> None:
        with self._lock:
            self._posted.append((queue, event))
            if len(self._posted) > 1:
                return  # a delivery is already on its way
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            posted, self._posted = self._posted, []
        for queue, event in posted:
            queue.put_nowait(event)


def create_app(scheduler: Scheduler, *, model_id: str, tokenizer, vocab_size: int, max_new_tokens: int,
               api_key: str | None = None, stream_interval: float = STREAM_INTERVAL_S) -> FastAPI:
    """The app; its lifespan starts and stops ``scheduler``'s thread. ``stream_interval``: seconds a
    stream waits after a chunk before it sends the tokens that arrived meanwhile (0: every wake-up).

    Longer than our usual limit because it is the route table: each endpoint is a few lines closing over
    ``scheduler`` and the settings, and splitting them apart would only pass those around."""

    @asynccontextmanager
    async def lifespan(app):
        app.state.mailbox = Mailbox(asyncio.get_running_loop())
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="pldr serve", lifespan=lifespan)
    created = int(time.time())
    served = {"requests": 0, "errors": 0}
    pldr_field = {"g_source": scheduler.step.g_source, "step": scheduler.step.name}

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        served["errors"] += 1
        return _error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        served["errors"] += 1
        first = exc.errors()[0]
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = where[0] if where else None
        return _error_response(400, f"{'.'.join(where) or 'body'}: {first.get('msg', 'invalid')}", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        return _error_response(exc.status_code, str(exc.detail), code=str(exc.status_code))

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "missing or wrong API key: send the header Authorization: Bearer KEY",
                           code="invalid_api_key")

    @app.get("/health")
    async def health():
        if not scheduler.alive:
            return _error_response(503, "the scheduler thread is not running", "server_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(_prometheus(scheduler.metrics(), served),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "pldr", "max_model_len": scheduler.max_len}]}

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(body: CompletionRequest, request: Request):
        served["requests"] += 1
        if body.model != model_id:
            raise ApiError(404, f"model {body.model!r} is not served here; GET /v1/models lists {model_id!r}",
                           param="model", code="model_not_found")
        prompts = _prompt_ids(body, tokenizer, vocab_size)
        max_tokens = _check_lengths(body, prompts, scheduler.max_len, max_new_tokens)
        sampler_args = _sampling(body)
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        mailbox = app.state.mailbox
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:
            mailbox.post(events, event)

        jobs = [Job(prompt=ids, max_tokens=max_tokens, sampler=Sampler(**sampler_args), emit=emit,
                    stop=stop, logprobs=body.logprobs, index=i) for i, ids in enumerate(prompts)]
        for job in jobs:
            scheduler.submit(job)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_id}
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(_stream(jobs, events, head, pldr_field, usage, stream_interval),
                                     media_type="text/event-stream")
        return await _collect(jobs, events, head, pldr_field, request)

    return app


def _prompt_ids(body: CompletionRequest, tokenizer, vocab_size: int) -> list[list[int]]:
    prompt = body.prompt
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "prompt is an empty list; give at least one prompt", param="prompt")
    out = []
    for p in prompt:
        if isinstance(p, str):
            out.append(encode_prompt(tokenizer, p))
            continue
        if not p:
            raise ApiError(400, "a token-id prompt needs at least one id", param="prompt")
        if not all(0 <= i < vocab_size for i in p):
            raise ApiError(400, f"prompt ids must be in 0..{vocab_size - 1}", param="prompt")
        out.append(list(p))
    return out


def _check_lengths(body: CompletionRequest, prompts: list[list[int]], context: int, cap: int) -> int:
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    if max_tokens < 1:
        raise ApiError(400, f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens")
    if max_tokens > cap:
        raise ApiError(400, f"max_tokens {max_tokens} is over this server's limit of {cap} "
                       "(pldr serve --max-new-tokens)", param="max_tokens")
    longest = max(len(p) for p in prompts)
    if longest >= context:
        raise ApiError(400, f"the prompt is {longest} tokens; the model's context is {context}",
                       param="prompt", code="context_length_exceeded")
    if longest + max_tokens > context:
        raise ApiError(400, f"prompt ({longest} tokens) + max_tokens {max_tokens} is over the model's "
                       f"context of {context}", param="max_tokens", code="context_length_exceeded")
    return max_tokens


def _sampling(body: CompletionRequest) -> dict:
    """Sampler arguments, after refusing what this server does not do."""
    unsupported = {"echo": body.echo, "n": body.n != 1, "best_of": body.best_of not in (None, 1),
                   "suffix": body.suffix is not None, "presence_penalty": bool(body.presence_penalty),
                   "frequency_penalty": bool(body.frequency_penalty)}
    for name, bad in unsupported.items():
        if bad:
            raise ApiError(400, f"{name}={getattr(body, name)!r} is not supported", param=name)
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    if temperature < 0:
        raise ApiError(400, f"temperature must be >= 0, got {temperature}", param="temperature")
    if not 0.0 < top_p <= 1.0:
        raise ApiError(400, f"top_p must be in (0, 1], got {top_p}", param="top_p")
    if body.top_k is not None and body.top_k < 0:
        raise ApiError(400, f"top_k must be >= 0 (0 = off), got {body.top_k}", param="top_k")
    if body.logprobs is not None and not 0 <= body.logprobs <= MAX_LOGPROBS:
        raise ApiError(400, f"logprobs must be in 0..{MAX_LOGPROBS}", param="logprobs")
    if isinstance(body.stop, list) and (len(body.stop) > MAX_STOPS or not all(body.stop)):
        raise ApiError(400, f"stop takes at most {MAX_STOPS} non-empty strings", param="stop")
    if body.stop == "":
        raise ApiError(400, "stop must not be empty", param="stop")
    return {"temperature": temperature, "top_p": top_p, "top_k": body.top_k or None,
            "greedy": temperature == 0, "seed": body.seed}


def _logprobs_json(event: Event) -> dict | None:
    if not event.logprobs:
        return None
    return {"tokens": [lp.token for lp in event.logprobs],
            "token_logprobs": [lp.logprob for lp in event.logprobs],
            "top_logprobs": [lp.top for lp in event.logprobs],
            "text_offset": [lp.offset for lp in event.logprobs]}


async def _collect(jobs, events, head, pldr_field, request: Request):
    """Gather every job's events into one response (cancelling the jobs if the client leaves)."""
    parts = {job.index: {"text": [], "ids": [], "lp": [], "finish": None} for job in jobs}
    usage = {"prompt_tokens": sum(len(j.prompt) for j in jobs), "completion_tokens": 0}
    left = len(jobs)
    try:
        while left:
            try:
                event = await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return _error_response(499, "client closed the request")
                continue
            if event.error is not None:
                raise ApiError(500, f"generation failed: {event.error}", type_="server_error")
            part = parts[event.index]
            part["text"].append(event.text)
            part["ids"] += event.token_ids
            part["lp"] += event.logprobs
            if event.finish_reason is not None:
                part["finish"] = event.finish_reason
                usage["completion_tokens"] += event.completion_tokens
                left -= 1
    finally:
        for job in jobs:
            job.cancel()
    choices = []
    for i, part in sorted(parts.items()):
        lp = _logprobs_json(Event(index=i, logprobs=part["lp"]))
        choices.append({"index": i, "text": "".join(part["text"]), "logprobs": lp,
                        "finish_reason": part["finish"], "token_ids": part["ids"]})
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return {**head, "choices": choices, "usage": usage, "pldr": pldr_field}


def _merged(events: list[Event]) -> list[Event]:
    """Consecutive events of one choice as one (text, tokens and logprobs joined; the last finish)."""
    out: dict[int, Event] = {}
    for e in events:
        if e.error is not None:
            return [e]
        m = out.get(e.index)
        if m is None:
            out[e.index] = Event(e.index, e.text, list(e.token_ids), list(e.logprobs), e.finish_reason,
                                 None, e.prompt_tokens, e.completion_tokens)
            continue
        m.text += e.text
        m.token_ids += e.token_ids
        m.logprobs += e.logprobs
        m.finish_reason, m.completion_tokens = e.finish_reason, e.completion_tokens
    return list(out.values())


async def _stream(jobs, events, head, pldr_field, include_usage: bool, interval: float):
    """Server-sent events: the tokens each choice gained since the last chunk (at most one chunk per
    choice every ``interval`` seconds), then ``[DONE]``. A client that goes away
    cancels this generator, and with it the jobs (their rows are freed before the next step)."""
    left, completion = len(jobs), 0
    try:
        while left:
            arrived = _merged([await events.get()] + [events.get_nowait() for _ in range(events.qsize())])
            failed = next((e for e in arrived if e.error is not None), None)
            if failed is not None:
                error = {"message": f"generation failed: {failed.error}", "type": "server_error",
                         "param": None, "code": None}
                yield f"data: {json.dumps({'error': error})}\n\n"
                break
            for event in arrived:
                choice = {"index": event.index, "text": event.text,
                          "logprobs": _logprobs_json(event), "finish_reason": event.finish_reason,
                          "token_ids": event.token_ids}
                yield f"data: {json.dumps({**head, 'choices': [choice], 'pldr': pldr_field})}\n\n"
                if event.finish_reason is not None:
                    completion += event.completion_tokens
                    left -= 1
            if left and interval > 0:
                await asyncio.sleep(interval)  # let tokens gather: one send carries several
        if include_usage and not left:
            prompt = sum(len(j.prompt) for j in jobs)
            usage = {"prompt_tokens": prompt, "completion_tokens": completion,
                     "total_tokens": prompt + completion}
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage, 'pldr': pldr_field})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        for job in jobs:
            job.cancel()


def _prometheus(m: dict, served: dict) -> str:
    rows = [
        ("pldr_requests_total", "counter", "Completion requests received.", served["requests"]),
        ("pldr_request_errors_total", "counter", "Requests answered with an error.", served["errors"]),
        ("pldr_completions_total", "counter", "Prompts completed (choices finished).", m["finished"]),
        ("pldr_completions_cancelled_total", "counter", "Prompts dropped because the client left.",
         m["cancelled"]),
        ("pldr_completions_failed_total", "counter", "Prompts that failed in the model.", m["failed"]),
        ("pldr_tokens_generated_total", "counter", "Tokens generated.", m["tokens"]),
        ("pldr_decode_steps_total", "counter", "Batched decode steps run.", m["steps"]),
        ("pldr_decode_chunks_total", "counter", "Launches of several greedy steps at once.", m["chunks"]),
        ("pldr_queue_length", "gauge", "Prompts waiting for a free row.", m["queued"]),
        ("pldr_active_rows", "gauge", "Rows decoding now.", m["active"]),
        ("pldr_rows", "gauge", "Rows in the batch (--max-batch).", m["rows"]),
        ("pldr_tokens_per_second", "gauge", "Tokens generated per second over the last seconds.",
         round(m["tokens_per_s"], 3)),
    ]
    lines = []
    for name, kind, help_, value in rows:
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
    return "\n".join(lines) + "\n"
