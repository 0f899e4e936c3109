"""
Talk to your model in a browser, or through an OpenAI-compatible API.

    python -m scripts.chat_web                           # latest SFT model on http://127.0.0.1:8000
    python -m scripts.chat_web -i rl -t 0.6 --workers 2
    python -m scripts.chat_web --checkpoint-dir ~/ckpt/d12 --port 8080

nanochat's chat_web.py (Oct 2025 to Jul 2026) served its ui.html and a streaming /chat/completions
endpoint. This keeps both and adds an OpenAI-compatible /v1 API, so existing clients work:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="mlxchat", messages=[{"role": "user", "content": "hi"}])

Endpoints
    GET  /                     the chat page (mlxchat/ui.html: one self-contained file, no external resources)
    GET  /health               liveness and readiness
    GET  /stats                workers busy/free, queue length, request counters
    POST /chat/completions     nanochat's API: {"messages", "temperature"?, "top_k"?, "max_tokens"?, "seed"?}
                               -> SSE: data: {"token": "...", "worker": 0} ... data: {"done": true, ...}
    GET  /v1/models            the loaded model
    POST /v1/chat/completions  OpenAI chat completions, "stream": true (chunks, then data: [DONE]) or false.
                               Honoured: messages, temperature, top_p, max_tokens / max_completion_tokens,
                               seed, n (1 only), stream_options.include_usage, and top_k (an extension).
                               "model" is ignored (there is one model; replies name it). stop, tools and
                               logprobs are refused with 400 rather than silently ignored.

Limits. Every refusal is a 4xx with a JSON body {"error": {"message": ...}}; bad input never causes a 500.
    body <= 1 MB (checked on the raw bytes as they arrive, before parsing; 413), received within 30 s
    (408), Content-Type application/json (415), valid UTF-8 JSON object (400)
    1..500 messages; roles system (first message only), user, assistant, alternating user/assistant
    and ending with a user message; user and system content non-empty; <= 8000 chars per message,
    <= 32000 chars in all
    temperature in [0, 2], top_k in [0, 200] (0 = off), top_p in (0, 1], max_tokens in [1, 4096], n = 1
    Prompt length: the rendered prompt must leave room for at least one new token in the model's
    context (sequence_len), otherwise 400. The reply is then capped to what fits: prompt + reply
    <= sequence_len, and a reply cut by that cap (or by max_tokens) ends with finish_reason "length".
    Nothing is ever truncated silently.

Concurrency. --workers engine workers share the (read-only) weights; each is one OS thread with its
own MLX stream and runs one generation at a time. A request waits (FIFO) for a free worker for at most
--queue-timeout seconds, and at most --max-queue requests wait; beyond either it gets 503 with
Retry-After. A client that disconnects cancels its generation at the next token and frees the worker.

Security. Bound to 127.0.0.1 by default; on a loopback address, requests must name a loopback Host
(this stops DNS-rebinding pages from reaching the server through your browser), and requests from a
browser page of another origin are refused. No CORS, no external resources, no conversation logging.
"""
import argparse
import asyncio
import ipaddress
import json
import logging
import math
import os
import queue
import secrets
import socket
import sys
import threading
import time
import uuid
from collections import deque
from importlib import resources
from urllib.parse import urlsplit

import mlxchat  # noqa: F401  (preloads OpenBLAS on Linux before mlx is imported)
import mlx.core as mx

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from mlxchat.chat import ReplyEnd, stream_chat

log = logging.getLogger("mlxchat.chat_web")

# -----------------------------------------------------------------------------
# Abuse limits: nanochat's values, plus a body-size cap and queue bounds

MAX_BODY_BYTES = 1_000_000
BODY_TIMEOUT = 30  # seconds to receive a request body
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_TOTAL_CHARS = 32000
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.0, 2.0
MIN_TOP_K, MAX_TOP_K = 0, 200
MIN_MAX_TOKENS, MAX_MAX_TOKENS = 1, 4096
MAX_SEED = 2**63 - 1
MAX_WORKERS = 32
ROLES = ("system", "user", "assistant")
LOOPBACK_HOSTNAMES = {"localhost", "127.0.0.1", "::1"}


class APIError(Exception):
    """A request we refuse: becomes an HTTP status with an OpenAI-style JSON error body."""

    def __init__(self, status, message, param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}


def error_body(message, status, param=None, code=None):
    kind = "invalid_request_error" if status < 500 else ("server_busy" if status == 503 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status, message, param=None, code=None, headers=None):
    return JSONResponse(error_body(message, status, param, code), status_code=status, headers=headers)


# -----------------------------------------------------------------------------
# Request parsing and validation (by hand, so every refusal has a precise message)

async def read_json_body(request):
    """The request body as a JSON object. The size cap is enforced on the raw bytes as they arrive,
    so an oversize body is never buffered whole nor handed to the JSON parser."""
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "application/json":
        # also keeps browsers on other sites from posting here with "simple" (no-preflight) requests
        raise APIError(415, "Content-Type must be application/json")
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared = int(declared)
        except ValueError:
            raise APIError(400, "invalid Content-Length header")
        if declared > MAX_BODY_BYTES:
            raise APIError(413, f"request body is {declared} bytes; the limit is {MAX_BODY_BYTES}")
    async def receive_body():
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise APIError(413, f"request body exceeds the limit of {MAX_BODY_BYTES} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        # a client trickling its body byte by byte must not hold a connection forever
        raw = await asyncio.wait_for(receive_body(), timeout=BODY_TIMEOUT)
    except asyncio.TimeoutError:
        raise APIError(408, f"request body not received within {BODY_TIMEOUT}s")

    def no_constants(name):  # Python's json accepts NaN and Infinity; JSON does not
        raise ValueError(f"{name} is not valid JSON")

    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=no_constants)
    except UnicodeDecodeError:
        raise APIError(400, "request body is not valid UTF-8")
    except (ValueError, RecursionError) as e:
        raise APIError(400, f"request body is not valid JSON: {str(e)[:200]}")
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    return body


def _number(body, name, lo, hi, default, integer=False, lo_open=False):
    value = body.get(name)
    if value is None:
        return default
    # bool is an int in Python, but `"temperature": true` is a client bug, not a 1
    ok_types = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_types):
        raise APIError(400, f"{name} must be {'an integer' if integer else 'a number'}, got {json.dumps(value)[:50]}", param=name)
    too_low = value <= lo if lo_open else value < lo
    if too_low or value > hi or value != value:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise APIError(400, f"{name} must be in {interval}, got {value}", param=name)
    return value


def _content_text(content, i):
    """Message content as a string: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", param=f"messages[{i}].content")
            texts.append(part["text"])
        return "".join(texts)
    if content is None:
        return ""
    raise APIError(400, f"messages[{i}].content must be a string", param=f"messages[{i}].content")


def parse_messages(body):
    """Validate `messages` and return them as [{"role", "content": str}]. The rules are those of the
    chat format the model was trained on (nanochat's render_conversation): an optional leading system
    message, then user/assistant turns alternating from user, ending with the user's turn."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise APIError(400, "messages must be a list of {role, content} objects", param="messages")
    if not messages:
        raise APIError(400, "messages must not be empty", param="messages")
    if len(messages) > MAX_MESSAGES:
        raise APIError(400, f"too many messages: {len(messages)} (limit {MAX_MESSAGES})", param="messages")
    out, total = [], 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object with role and content", param=f"messages[{i}]")
        role = m.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ROLES:
            raise APIError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}, got {json.dumps(role)[:50]}",
                           param=f"messages[{i}].role")
        text = _content_text(m.get("content"), i)
        if len(text) > MAX_MESSAGE_CHARS:
            raise APIError(400, f"messages[{i}] is {len(text)} characters (limit {MAX_MESSAGE_CHARS})", param=f"messages[{i}].content")
        total += len(text)
        if total > MAX_TOTAL_CHARS:
            raise APIError(400, f"the conversation exceeds {MAX_TOTAL_CHARS} characters in all", param="messages")
        # an empty assistant turn is legal (the model may end its reply at once); an empty question is not
        if role != "assistant" and not text.strip():
            raise APIError(400, f"messages[{i}] ({role}) has empty content", param=f"messages[{i}].content")
        out.append({"role": role, "content": text})
    turns = out[1:] if out[0]["role"] == "system" else out
    if not turns:
        raise APIError(400, "a system message must be followed by a user message", param="messages")
    for j, m in enumerate(turns):
        expected = "user" if j % 2 == 0 else "assistant"
        if m["role"] != expected:
            i = j + (len(out) - len(turns))
            raise APIError(400, f"messages[{i}] is from {m['role']}, expected {expected}: after an optional first "
                                f"system message, user and assistant turns must alternate, starting with user",
                           param=f"messages[{i}].role")
    if turns[-1]["role"] != "user":
        raise APIError(400, "the last message must be from the user", param="messages")
    return out


class Settings:
    """One validated generation request."""

    def __init__(self, messages, temperature, top_k, top_p, max_tokens, seed, stream=True, include_usage=False):
        self.messages, self.temperature, self.top_k, self.top_p = messages, temperature, top_k, top_p
        self.max_tokens, self.seed, self.stream, self.include_usage = max_tokens, seed, stream, include_usage


def parse_request(body, defaults, openai):
    """Validate a chat request body. `defaults` holds the server's -t/-k/-m; OpenAI clients get the
    same defaults (the operator's choice), and may also send top_k as an extension."""
    if openai:
        n = body.get("n")
        if n is not None and (isinstance(n, bool) or n != 1):
            raise APIError(400, "only n=1 is supported", param="n")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise APIError(400, "model must be a string", param="model")
        stop = body.get("stop")
        if stop:  # null, "" and [] are harmless; real stop sequences would be silently ignored
            raise APIError(400, "stop sequences are not supported", param="stop")
        for name in ("tools", "functions"):
            if body.get(name):
                raise APIError(400, f"{name} are not supported by this model", param=name)
        if body.get("logprobs"):
            raise APIError(400, "logprobs are not supported", param="logprobs")
    messages = parse_messages(body)
    temperature = float(_number(body, "temperature", MIN_TEMPERATURE, MAX_TEMPERATURE, defaults.temperature))
    top_k = _number(body, "top_k", MIN_TOP_K, MAX_TOP_K, defaults.top_k, integer=True)
    top_p = _number(body, "top_p", 0.0, 1.0, None, lo_open=True)
    # OpenAI renamed max_tokens to max_completion_tokens; accept both, the newer name wins
    max_tokens = _number(body, "max_completion_tokens", MIN_MAX_TOKENS, MAX_MAX_TOKENS, None, integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", MIN_MAX_TOKENS, MAX_MAX_TOKENS, defaults.max_tokens, integer=True)
    seed = _number(body, "seed", 0, MAX_SEED, None, integer=True)
    if seed is None:
        seed = secrets.randbelow(2**31)  # a fresh seed per request, as nanochat: replies differ
    stream = (body.get("stream") or False) if openai else True
    if not isinstance(stream, bool):
        raise APIError(400, "stream must be true or false", param="stream")
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise APIError(400, "stream_options must be an object", param="stream_options")
        include_usage = bool(options.get("include_usage", False))
    return Settings(messages, temperature, top_k, top_p, max_tokens, seed, stream, include_usage)


# -----------------------------------------------------------------------------
# Workers: one thread per engine, jobs handed over from the event loop

class Busy(APIError):
    def __init__(self, message, retry_after):
        super().__init__(503, message, code="server_busy", headers={"Retry-After": str(retry_after)})


class Job:
    """One generation. The worker thread pushes events into an asyncio queue owned by the event loop:
    ("text", str) pieces of the reply, then ("end", finish_reason, n_tokens) or ("error", message)."""

    def __init__(self, loop, prompt_ids, max_tokens, settings):
        self.loop, self.prompt_ids, self.max_tokens, self.settings = loop, prompt_ids, max_tokens, settings
        self.events = asyncio.Queue()
        self.cancelled = threading.Event()
        self.worker_id = None

    def put(self, *event):  # called from the worker thread
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:
            pass  # the event loop is gone (server shutting down): nobody is listening

    def cancel(self):
        self.cancelled.set()

    async def stream(self):
        while True:
            event = await self.events.get()
            yield event
            if event[0] in ("end", "error"):
                return


class Worker:
    def __init__(self, wid, pool):
        self.id, self.pool = wid, pool
        self.jobs = queue.Queue()
        self.busy = False
        self.ready = False  # warmed up
        self.job = None  # the job being generated
        self.requests = 0
        self.tokens = 0
        self.thread = threading.Thread(target=self._run, name=f"engine-worker-{wid}", daemon=True)

    def _run(self):
        from mlxchat.engine import Engine
        # Since MLX 0.31.2 streams belong to the thread that made them (on Metal, a stream's command
        # encoder is thread-local). So each worker makes its own stream here and creates and evaluates
        # every array of its generations (KV cache, logits, samples) on it. The weights are shared,
        # read-only, and were fully evaluated before any worker started, so no lazy graph is shared.
        stream = mx.new_stream(mx.default_device())
        with mx.stream(stream):
            engine = Engine(self.pool.model, self.pool.tokenizer)
            self._warm_up(engine)
            self.pool.release_from_thread(self)  # only now does the worker take requests
            while True:
                job = self.jobs.get()
                if job is None:
                    return
                self.job = job
                try:
                    self._generate(engine, job)
                except Exception as e:
                    log.exception(f"worker {self.id}: generation failed")
                    job.put("error", f"generation failed ({type(e).__name__}); see the server log")
                finally:
                    self.job = None
                    self.pool.release_from_thread(self)

    def _warm_up(self, engine):
        # The first generation compiles the decode step (and, on the CPU backend, its kernels):
        # seconds, not milliseconds. Pay that before serving, with the default sampling settings
        # (a different temperature/top-k shape compiles once more, quickly).
        d = self.pool.defaults
        t0 = time.time()
        try:
            for _ in engine.generate([self.pool.tokenizer.get_bos_token_id()], max_tokens=3,
                                     temperature=d.temperature, top_k=d.top_k or None, seed=0):
                pass
        except Exception:
            log.exception(f"worker {self.id}: warm-up failed (serving anyway)")
        log.info(f"worker {self.id}: warmed up in {time.time() - t0:.2f}s")

    def _generate(self, engine, job):
        s = job.settings
        # stream_chat holds back a character split across tokens until it is whole, and stops at
        # <|assistant_end|> / <|bos|> or, at the next token, once the client has gone
        for piece in stream_chat(engine, self.pool.tokenizer, job.prompt_ids, max_tokens=job.max_tokens,
                                 temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed,
                                 should_stop=job.cancelled.is_set):
            if isinstance(piece, ReplyEnd):
                end = piece
            else:
                job.put("text", piece.text)
        finish = {"end": "stop", "length": "length", "stopped": "cancelled"}[end.reason]
        n = end.num_tokens
        self.requests += 1
        self.tokens += n
        self.pool.record_duration(end.seconds)
        if finish == "cancelled":
            self.pool.count_from_thread("cancelled")
        log.info(f"worker {self.id}: {len(job.prompt_ids)} prompt + {n} new tokens in {end.seconds:.2f}s "
                 f"({end.tok_per_sec:.1f} tok/s), {finish}")
        job.put("end", finish, n)


class WorkerPool:
    """Free workers wait in an asyncio queue; a request takes one (FIFO among waiters), hands it a Job,
    and the worker puts itself back when the generation has really stopped (so a cancelled job's
    worker is not reused while it still computes)."""

    def __init__(self, model, tokenizer, num_workers, queue_timeout, max_queue, defaults):
        self.model, self.tokenizer, self.defaults = model, tokenizer, defaults
        self.workers = [Worker(i, self) for i in range(num_workers)]
        self.queue_timeout, self.max_queue = queue_timeout, max_queue
        self.waiting = 0
        self.counters = {"completed": 0, "cancelled": 0, "rejected_queue_full": 0, "rejected_queue_timeout": 0}
        self.durations = deque(maxlen=32)
        self.loop = None
        self.free = None

    def start(self):
        self.loop = asyncio.get_running_loop()
        self.free = asyncio.Queue()
        for w in self.workers:
            w.thread.start()  # it joins the free queue once warmed up

    def stop(self):
        for w in self.workers:
            job = w.job
            if job is not None:
                job.cancel()
            w.jobs.put(None)
        # a cancelled generation ends at its next token; let the threads finish before the interpreter
        # does (a daemon thread killed inside an MLX call can crash the exit)
        for w in self.workers:
            w.thread.join(timeout=5)

    def record_duration(self, seconds):
        self.durations.append(seconds)

    def retry_after(self):
        # a hint for clients: about one typical generation
        avg = sum(self.durations) / len(self.durations) if self.durations else 1.0
        return max(1, min(60, math.ceil(avg)))

    async def submit(self, job):
        """Wait for a free worker (bounded in time and queue length) and start `job` on it."""
        if self.free.empty() and self.waiting >= self.max_queue:
            self.counters["rejected_queue_full"] += 1
            raise Busy(f"server busy: {self.waiting} requests already waiting; try again shortly", self.retry_after())
        self.waiting += 1
        try:
            worker = await asyncio.wait_for(self.free.get(), timeout=self.queue_timeout)
        except asyncio.TimeoutError:
            self.counters["rejected_queue_timeout"] += 1
            raise Busy(f"server busy: no worker became free within {self.queue_timeout:g}s; try again shortly",
                       self.retry_after())
        finally:
            self.waiting -= 1
        worker.busy = True
        job.worker_id = worker.id
        worker.jobs.put(job)

    def count_from_thread(self, name):
        try:
            self.loop.call_soon_threadsafe(lambda: self.counters.__setitem__(name, self.counters[name] + 1))
        except RuntimeError:
            pass

    def release_from_thread(self, worker):
        def release():  # on the event loop, like every other change to the pool's bookkeeping
            worker.ready, worker.busy = True, False
            self.free.put_nowait(worker)
        try:
            self.loop.call_soon_threadsafe(release)
        except RuntimeError:
            pass  # loop closed: shutting down

    def stats(self):
        busy = sum(w.busy for w in self.workers)
        return {
            "total_workers": len(self.workers),
            "ready_workers": sum(w.ready for w in self.workers),
            "busy_workers": busy,
            "available_workers": self.free.qsize() if self.free else 0,
            "queued_requests": self.waiting,
            "max_queue": self.max_queue,
            "queue_timeout": self.queue_timeout,
            "workers": [{"id": w.id, "ready": w.ready, "busy": w.busy, "requests": w.requests, "tokens": w.tokens}
                        for w in self.workers],
            "requests": dict(self.counters),
        }


# -----------------------------------------------------------------------------
# Host / Origin guard (a plain ASGI middleware, so streaming responses pass through untouched)

def _host_name(host_header):
    host = host_header.strip().lower()
    if host.startswith("["):  # [::1]:8000
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class GuardMiddleware:
    """On a loopback bind, only requests that name a loopback host are served: a web page can point
    its own domain at 127.0.0.1 (DNS rebinding) and then read our responses, but its requests still
    carry its own domain in the Host header. Browser requests from another origin that change state
    (POST) are refused outright; non-browser clients send no Origin header."""

    def __init__(self, app, loopback_only):
        self.app, self.loopback_only = app, loopback_only

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            host = headers.get("host", "")
            message = None
            if self.loopback_only and _host_name(host) not in LOOPBACK_HOSTNAMES:
                message = f"Host {host[:100]!r} is not allowed: this server only answers requests for localhost"
            origin = headers.get("origin")
            if message is None and origin is not None and scope["method"] not in ("GET", "HEAD"):
                if urlsplit(origin).netloc.lower() != host.lower():
                    message = "cross-origin requests are not allowed"
            if message is not None:
                await error_response(403, message)(scope, receive, send)
                return
        await self.app(scope, receive, send)


# -----------------------------------------------------------------------------
# The app

class JobStreamingResponse(StreamingResponse):
    """A streaming response that cancels its job however it ends: finished, client gone (Starlette
    cancels the sending task on disconnect), or never started at all."""

    def __init__(self, job, content):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


def sse(obj):
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(model, tokenizer, model_id, args):
    context = model.config.sequence_len
    defaults = argparse.Namespace(temperature=args.temperature, top_k=args.top_k, max_tokens=args.max_tokens)
    pool = WorkerPool(model, tokenizer, args.workers, args.queue_timeout, args.max_queue, defaults)
    ui_html = resources.files("mlxchat").joinpath("ui.html").read_bytes()
    created = int(time.time())
    assistant_start = tokenizer.encode_special("<|assistant_start|>")

    async def lifespan(app):
        pool.start()
        log.info(f"starting {len(pool.workers)} engine worker(s); model {model_id}, context {context} tokens")
        yield
        pool.stop()

    app = FastAPI(title="mlxchat", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def api_error(request, exc):
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request, exc):
        log.exception("unhandled error")
        return error_response(500, "internal server error; see the server log")

    def prepare(settings):
        """Render the prompt and fit the reply into the context (the rule in the module docstring)."""
        # This is tokenizer.render_for_completion (render the turns, then <|assistant_start|>), except
        # that render_conversation's default 2048-token cut is replaced by a limit we check here: a
        # silently cut prompt would lose the user's latest words.
        ids, _ = tokenizer.render_conversation({"messages": settings.messages}, max_tokens=context + 1)
        ids.append(assistant_start)
        if len(ids) >= context:
            raise APIError(400, f"the conversation is {len(ids)} tokens; this model's context is {context} tokens. "
                                f"Start a new chat or shorten the messages.", param="messages",
                           code="context_length_exceeded")
        return ids, min(settings.max_tokens, context - len(ids))

    async def start_job(settings):
        ids, max_new = prepare(settings)
        job = Job(asyncio.get_running_loop(), ids, max_new, settings)
        await pool.submit(job)
        return job

    @app.get("/")
    async def root():
        csp = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; "
               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
        return Response(ui_html, media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff",
                                 "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"})

    @app.get("/health")
    async def health():
        ready = sum(w.ready for w in pool.workers)
        return {"status": "ok", "ready": ready > 0, "model": model_id, "workers": len(pool.workers),
                "ready_workers": ready, "available_workers": pool.free.qsize() if pool.free else 0,
                "defaults": {"temperature": args.temperature, "top_k": args.top_k, "max_tokens": args.max_tokens}}

    @app.get("/stats")
    async def stats():
        return {"model": model_id, "context": context, **pool.stats()}

    @app.post("/chat/completions")
    async def chat_completions(request: Request):
        """nanochat's streaming endpoint (what ui.html talks to)."""
        settings = parse_request(await read_json_body(request), defaults, openai=False)
        job = await start_job(settings)

        async def events():
            try:
                async for event in job.stream():
                    if event[0] == "text":
                        yield sse({"token": event[1], "worker": job.worker_id})
                    elif event[0] == "end":
                        pool.counters["completed"] += 1
                        yield sse({"done": True, "finish_reason": event[1], "prompt_tokens": len(job.prompt_ids),
                                   "completion_tokens": event[2], "seed": settings.seed})
                    else:
                        yield sse({"error": event[1]})
            finally:
                job.cancel()

        return JobStreamingResponse(job, events())

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "mlxchat", "context_length": context}]}

    @app.post("/v1/chat/completions")
    async def openai_chat_completions(request: Request):
        settings = parse_request(await read_json_body(request), defaults, openai=True)
        job = await start_job(settings)
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        now = int(time.time())

        def usage(n):
            return {"prompt_tokens": len(job.prompt_ids), "completion_tokens": n, "total_tokens": len(job.prompt_ids) + n}

        if settings.stream:
            def chunk(delta, finish_reason=None):
                c = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": model_id,
                     "system_fingerprint": None,
                     "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
                if settings.include_usage:
                    c["usage"] = None
                return c

            async def events():
                try:
                    yield sse(chunk({"role": "assistant", "content": ""}))
                    async for event in job.stream():
                        if event[0] == "text":
                            yield sse(chunk({"content": event[1]}))
                        elif event[0] == "end":
                            pool.counters["completed"] += 1
                            yield sse(chunk({}, event[1]))
                            if settings.include_usage:
                                yield sse({"id": cid, "object": "chat.completion.chunk", "created": now,
                                           "model": model_id, "system_fingerprint": None, "choices": [],
                                           "usage": usage(event[2])})
                        else:
                            yield sse(error_body(event[1], 500))
                    yield "data: [DONE]\n\n"
                finally:
                    job.cancel()

            return JobStreamingResponse(job, events())

        # Not streaming: collect the reply, checking now and then that the client is still there
        # (Starlette does not notice a disconnect while an endpoint is still computing its response).
        parts, finish, n = [], None, 0
        next_check = time.monotonic() + 0.5
        try:
            while finish is None:
                try:
                    event = await asyncio.wait_for(job.events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    event = None
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + 0.5
                    if await request.is_disconnected():
                        job.cancel()
                        return Response(status_code=499)  # nobody will read it
                if event is None:
                    continue
                if event[0] == "text":
                    parts.append(event[1])
                elif event[0] == "end":
                    finish, n = event[1], event[2]
                else:
                    raise APIError(500, event[1])
        finally:
            job.cancel()
        pool.counters["completed"] += 1
        return {"id": cid, "object": "chat.completion", "created": now, "model": model_id, "system_fingerprint": None,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                             "logprobs": None, "finish_reason": finish}],
                "usage": usage(n)}

    app.state.pool = pool
    return GuardMiddleware(app, loopback_only=is_loopback(args.host))


# -----------------------------------------------------------------------------
# Loading and serving

def is_loopback(host):
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load(args):
    """(model, tokenizer, model_id) from --checkpoint-dir or the base dir's <source> checkpoints."""
    from mlxchat.checkpoint_manager import SOURCE_DIRS, build_model, find_largest_model, find_last_step
    from mlxchat.common import get_base_dir
    if args.checkpoint_dir:
        checkpoint_dir = os.path.abspath(os.path.expanduser(args.checkpoint_dir))
        name = os.path.basename(checkpoint_dir.rstrip("/"))
    else:
        checkpoints_dir = os.path.join(get_base_dir(), SOURCE_DIRS[args.source])
        tag = args.model_tag or find_largest_model(checkpoints_dir)
        checkpoint_dir = os.path.join(checkpoints_dir, tag)
        name = f"{args.source}-{tag}"
    step = args.step if args.step is not None else find_last_step(checkpoint_dir)
    model, tokenizer, _meta = build_model(checkpoint_dir, step, phase="eval")
    if tokenizer is None:
        raise FileNotFoundError(f"no tokenizer.pkl found for {checkpoint_dir}: put it beside the checkpoint "
                                f"or in <base dir>/tokenizer")
    return model, tokenizer, f"mlxchat-{name}-step{step}"


def materialize(model):
    """Evaluate every array the model holds, on this thread, before any worker starts. That includes
    private buffers such as the rotary tables, which are not parameters: a still-lazy array belongs
    to the stream of the thread that built it, and evaluating it from a worker thread fails with
    "There is no Stream(cpu, 0) in current thread". Workers then only ever read finished arrays."""
    from mlx.utils import tree_flatten
    mx.eval([v for _, v in tree_flatten(model) if isinstance(v, mx.array)])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip() + " See the module docstring for endpoints and limits.")
    p.add_argument("-i", "--source", default="sft", choices=["sft", "rl", "base"], help="which checkpoints to load (default: sft)")
    p.add_argument("-g", "--model-tag", default=None, help="model tag, e.g. d12 (default: the largest)")
    p.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last)")
    p.add_argument("--checkpoint-dir", default=None, help="load this checkpoint directory instead (model_*.{safetensors,pt} + meta_*.json, tokenizer.pkl beside it)")
    p.add_argument("-t", "--temperature", type=float, default=0.8, help="default temperature (default: 0.8)")
    p.add_argument("-k", "--top-k", type=int, default=50, help="default top-k, 0 = off (default: 50)")
    p.add_argument("-m", "--max-tokens", type=int, default=512, help="default max new tokens per reply (default: 512)")
    p.add_argument("-p", "--port", type=int, default=8000, help="port (default: 8000; 0 = any free port)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: 127.0.0.1, this machine only). 0.0.0.0 exposes the server to "
                        "your whole network, without authentication")
    p.add_argument("--workers", type=int, default=1, help=f"engine workers = concurrent generations, sharing one copy of the weights (default: 1, max {MAX_WORKERS})")
    p.add_argument("--queue-timeout", type=float, default=30.0, help="seconds a request may wait for a free worker before a 503 (default: 30)")
    p.add_argument("--max-queue", type=int, default=32, help="requests allowed to wait for a worker; more get a 503 at once (default: 32)")
    p.add_argument("--quantize", type=int, default=None, choices=[4, 8],
                   help="quantize the weight matrices to 4 or 8 bits after loading (less memory, faster decoding)")
    args = p.parse_args(argv)
    if not (MIN_TEMPERATURE <= args.temperature <= MAX_TEMPERATURE):
        p.error(f"--temperature must be in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}]")
    if not (MIN_TOP_K <= args.top_k <= MAX_TOP_K):
        p.error(f"--top-k must be in [{MIN_TOP_K}, {MAX_TOP_K}]")
    if not (MIN_MAX_TOKENS <= args.max_tokens <= MAX_MAX_TOKENS):
        p.error(f"--max-tokens must be in [{MIN_MAX_TOKENS}, {MAX_MAX_TOKENS}]")
    if not (1 <= args.workers <= MAX_WORKERS):
        p.error(f"--workers must be in [1, {MAX_WORKERS}]")
    if not (args.queue_timeout > 0):
        p.error("--queue-timeout must be > 0")
    if args.max_queue < 0:
        p.error("--max-queue must be >= 0")

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        model, tokenizer, model_id = load(args)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"chat_web: could not load a model: {e}", file=sys.stderr)
        return 2
    if args.quantize:
        from mlxchat.quantize import quantize_model
        quantize_model(model, args.quantize)
        model_id += f"-q{args.quantize}"
    materialize(model)

    app = create_app(model, tokenizer, model_id, args)

    import uvicorn
    # Bind the socket ourselves, so the real port (for --port 0) is known and printed before serving.
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    if os.name != "nt":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host.strip("[]"), args.port))
    except OSError as e:
        print(f"chat_web: cannot bind {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    port = sock.getsockname()[1]
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"mlxchat chat server: http://{shown}:{port}/  (model {model_id}, {args.workers} worker(s))", flush=True)
    if not is_loopback(args.host):
        print(f"warning: bound to {args.host}: anyone who can reach this machine can use the server", flush=True)
    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=3,
                            # a bound on open connections: workers + queue, and room for /health, /stats, the page
                            limit_concurrency=args.workers + args.max_queue + 32)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
