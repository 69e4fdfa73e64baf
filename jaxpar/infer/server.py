"""`jaxpar serve`: the OpenAI HTTP API over the continuous-batching engine.

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (both with `stream: true` as
server-sent events ending in `data: [DONE]`), `GET /v1/models`, `GET /health` and `GET /metrics`
(Prometheus text). Errors are OpenAI error objects, `{"error": {"message", "type", "param",
"code"}}`: 400 for a request that is malformed or does not fit the context, 404 for another
model's name or an unknown path, 429 when `serve.max_queue` requests already wait, 503 while
shutting down. Fields jaxpar does not know are ignored, as the OpenAI API does; known fields of the
wrong type or out of range are refused.

Built on Starlette, uvicorn and prometheus-client (the `serve` extra).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from jaxpar.errors import JaxparError, typed
from jaxpar.infer.chat import render_chat
from jaxpar.infer.engine import check_context
from jaxpar.infer.sampling import DEFAULT_TEMPERATURE, Sampling
from jaxpar.infer.scheduler import Closed, Engine, Event, Params, QueueFull, Request

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# OpenAI's defaults for a request's fields (its API reference): what a request that omits one gets
# (the temperature's is the engine's `DEFAULT_TEMPERATURE`, the one default of every command).
# A chat completion's `max_tokens` defaults to what the context leaves after the prompt instead.
DEFAULT_COMPLETION_TOKENS = 16  # /v1/completions' max_tokens
DEFAULT_TOP_P = 1.0
DEFAULT_TOP_K = 0  # no limit (vLLM's extension; -1 says the same)
DEFAULT_N = 1  # choices per request, the only number jaxpar returns
MAX_STOPS = 4  # strings in `stop`


class ApiError(Exception):
    """An answer with an OpenAI error object."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = (
            status, message, param, kind, code,
        )  # fmt: skip

    def body(self) -> dict:
        error = {"message": self.message, "type": self.kind, "param": self.param,
                 "code": self.code}  # fmt: skip
        return {"error": error}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


# -- request fields --------------------------------------------------------------------------


def _field(body: dict, name: str, types: tuple[type, ...], default: Any = None) -> Any:
    """`body[name]` checked against `types` (None or absent: `default`)."""
    value = body.get(name)
    if value is None:
        return default
    try:
        return typed(value, types, f"'{name}'")
    except JaxparError as e:
        raise ApiError(400, str(e), name) from None


def _range(name: str, value: float, low: float, high: float, low_open: bool = False) -> None:
    if value < low or value > high or (low_open and value == low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ApiError(400, f"'{name}' must be in {bound}, got {value}", name)


def _stops(body: dict) -> tuple[str, ...]:
    stop = _field(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) for s in stop) or len(stop) > MAX_STOPS:
        raise ApiError(
            400, f"'stop' must be a string or an array of at most {MAX_STOPS} strings", "stop"
        )
    return tuple(s for s in stop if s)


def _params(body: dict, max_tokens: int, engine: Engine, prompt_len: int) -> Params:
    """The generation settings of a request body; `max_tokens` is the default."""
    n = _field(body, "n", (int,), DEFAULT_N)
    if n != DEFAULT_N:
        raise ApiError(400, f"'n' = {n} is not supported: jaxpar returns 1 choice a request", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if _field(body, name, (float,), 0) != 0:
            raise ApiError(400, f"'{name}' is not supported (only 0)", name)
    if _field(body, "logprobs", (bool, int), False) not in (False, 0) or body.get("top_logprobs"):
        raise ApiError(400, "'logprobs' is not supported", "logprobs")
    if _field(body, "echo", (bool,), False):
        raise ApiError(400, "'echo' is not supported", "echo")
    if _field(body, "best_of", (int,), 1) != 1:
        raise ApiError(400, "'best_of' other than 1 is not supported", "best_of")
    name = (
        "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    )
    tokens = _field(body, name, (int,), max_tokens)
    if tokens < 1:
        raise ApiError(400, f"'{name}' must be at least 1, got {tokens}", name)
    temperature = _field(body, "temperature", (float,), DEFAULT_TEMPERATURE)
    _range("temperature", temperature, 0, 2)
    top_p = _field(body, "top_p", (float,), DEFAULT_TOP_P)
    _range("top_p", top_p, 0, 1, low_open=True)
    top_k = _field(body, "top_k", (int,), DEFAULT_TOP_K)
    if top_k < -1:
        raise ApiError(400, f"'top_k' must be -1 or 0 (no limit) or more, got {top_k}", "top_k")
    seed = _field(body, "seed", (int,), None)
    stop_ids = _field(body, "stop_token_ids", (list,), [])
    vocab = engine.model.config.model.vocab
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab
               for i in stop_ids):  # fmt: skip
        raise ApiError(400, f"'stop_token_ids' must be ids in [0, {vocab})", "stop_token_ids")
    params = Params(
        max_tokens=tokens, sampling=Sampling(temperature, max(top_k, 0), top_p),
        seed=None if seed is None else seed % (1 << 31), stop=_stops(body),
        stop_ids=tuple(stop_ids), ignore_eos=_field(body, "ignore_eos", (bool,), False),
    )  # fmt: skip
    try:
        check_context(prompt_len, params.max_tokens, engine.model.context, name)
    except JaxparError as e:
        raise ApiError(400, str(e), name, code="context_length_exceeded") from None
    return params


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"messages[{i}].content must be a string or text parts", "messages")


def _messages(body: dict) -> list[dict[str, str]]:
    messages = _field(body, "messages", (list,), None)
    if not messages:
        raise ApiError(400, "'messages' must be a non-empty array of messages", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a 'role'", "messages")
        out.append({"role": m["role"], "content": _content(m, i)})
    return out


# -- the app ---------------------------------------------------------------------------------


class Metrics:
    """The server's Prometheus metrics, in a registry of its own."""

    def __init__(self, engine: Engine):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("jaxpar_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)  # fmt: skip
        Gauge("jaxpar_queue_length", "Requests waiting for a slot", registry=r).set_function(
            lambda: engine.queue_length
        )
        Gauge("jaxpar_active_slots", "Slots holding a request", registry=r).set_function(
            lambda: engine.active_slots
        )
        Gauge("jaxpar_slots", "Decode slots", registry=r).set(engine.slots)
        Gauge("jaxpar_kv_block_bytes", "KV cache bytes of a block (all layers)",
              registry=r).set(engine.generator.block_bytes)  # fmt: skip
        self.prompt_tokens = Counter("jaxpar_prompt_tokens", "Prompt tokens", registry=r)
        self.generation_tokens = Counter("jaxpar_generation_tokens", "New tokens", registry=r)
        self.ttft = Histogram("jaxpar_time_to_first_token_seconds", "Arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.itl = Histogram("jaxpar_inter_token_latency_seconds", "Between a request's tokens",
                             buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.tpot = Histogram("jaxpar_time_per_output_token_seconds",
                              "A request's decode time over its tokens after the first",
                              buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        r.register(_CacheCollector(engine))

    def finished(self, request: Request) -> None:
        self.prompt_tokens.inc(len(request.prompt))
        self.generation_tokens.inc(len(request.tokens))
        times = request.times
        if times:
            self.ttft.observe(times[0] - request.arrival)
        for a, b in zip(times, times[1:], strict=False):
            self.itl.observe(b - a)
        if len(times) > 1:
            self.tpot.observe((times[-1] - times[0]) / (len(times) - 1))


class _CacheCollector:
    """The paged cache's state, read when scraped: blocks, preemptions, prefix hits."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        pools = self.engine.pools
        queried = sum(p.queried_tokens for p in pools)
        hits = sum(p.hit_tokens for p in pools)
        used = sum(p.used for p in pools)
        yield GaugeMetricFamily("jaxpar_kv_blocks", "Blocks of the paged KV cache (all shards)",
                                value=sum(p.blocks for p in pools))  # fmt: skip
        yield GaugeMetricFamily("jaxpar_kv_blocks_used", "Blocks that requests hold", value=used)
        yield GaugeMetricFamily("jaxpar_kv_blocks_free", "Blocks free, or cached and held by no "
                                "request", value=sum(p.available for p in pools))  # fmt: skip
        yield GaugeMetricFamily("jaxpar_kv_blocks_cached", "Blocks that hold a cached prefix",
                                value=sum(p.cached for p in pools))  # fmt: skip
        yield CounterMetricFamily("jaxpar_preemptions", "Requests whose blocks were taken back",
                                  value=self.engine.preemptions)  # fmt: skip
        yield CounterMetricFamily(
            "jaxpar_prefix_cache_queried_tokens", "Prompt tokens looked up", value=queried
        )
        yield CounterMetricFamily(
            "jaxpar_prefix_cache_hit_tokens", "Prompt tokens found in the cache", value=hits
        )
        yield GaugeMetricFamily("jaxpar_prefix_cache_hit_rate", "Hit tokens over queried tokens",
                                value=hits / queried if queried else 0.0)  # fmt: skip
        yield CounterMetricFamily("jaxpar_prefilled_tokens", "Prompt tokens computed",
                                  value=self.engine.prefilled_tokens)  # fmt: skip


class _Handoff:
    """Events from the engine's thread to the event loop: one wake-up of the loop for all the
    events of a step, not one per token per request."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._pending: deque[tuple[asyncio.Queue, Event]] = deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def put(self, queue: asyncio.Queue, event: Event) -> None:
        with self._lock:
            self._pending.append((queue, event))
            if self._scheduled:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            items, self._scheduled = list(self._pending), False
            self._pending.clear()
        for queue, event in items:
            queue.put_nowait(event)


class _Stream(StreamingResponse):
    """Server-sent events that cancel their request however the response ends (a client that
    disconnects frees its slot at once)."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})  # fmt: skip
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _usage(request: Request) -> dict:
    u = request.usage
    return {"prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"],
            "total_tokens": u["total_tokens"],
            "prompt_tokens_details": {"cached_tokens": u["cached_tokens"]}}  # fmt: skip


def _choice(chat: bool, text: str | None, finish: str | None, role: bool = False) -> dict:
    """One choice of a completion (`text`) or of a chat completion chunk (`delta`)."""
    if not chat:
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    delta = {"role": "assistant", "content": ""} if role else {}
    if text:
        delta["content"] = text
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


def _prompt_ids(body: dict, model) -> list[int]:
    """The token ids of a completion request's `prompt` (a string or ids, one prompt)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        ids = model.encode(prompt)
    elif (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt)
    ):
        ids = prompt
    else:
        raise ApiError(400, "'prompt' must be a non-empty string or array of token ids "
                       "(one prompt a request)", "prompt")  # fmt: skip
    if not ids:
        raise ApiError(400, "'prompt' is empty; give at least one token", "prompt")
    return ids


class _Api:
    """The endpoints of one app: the engine, the model's name and the metrics they share."""

    def __init__(self, engine: Engine, model_name: str):
        self.engine, self.model_name, self.model = engine, model_name, engine.model
        self.metrics = Metrics(engine)
        self.created = int(time.time())
        self.handoffs: dict[asyncio.AbstractEventLoop, _Handoff] = {}

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created,
                "owned_by": "jaxpar", "max_model_len": self.model.context}  # fmt: skip

    async def read_body(self, request: HttpRequest) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        name = _field(body, "model", (str,), self.model_name)
        if name != self.model_name:
            message = f"the model '{name}' does not exist; this server serves '{self.model_name}'"
            raise ApiError(404, message, "model", code="model_not_found")
        return body

    def submit(self, ids: list[int], params: Params) -> tuple[Request, asyncio.Queue]:
        """Queues a request; its events arrive on the returned queue, in this event loop."""
        loop = asyncio.get_running_loop()
        handoff = self.handoffs.setdefault(loop, _Handoff(loop))
        queue: asyncio.Queue[Event] = asyncio.Queue()
        try:
            request = self.engine.submit(ids, params, lambda e: handoff.put(queue, e))
        except QueueFull as e:
            raise ApiError(429, str(e), kind="rate_limit_error", code="queue_full") from None
        except Closed as e:
            raise ApiError(503, str(e), kind="server_error", code="shutting_down") from None
        except JaxparError as e:
            raise ApiError(400, str(e), "prompt") from None
        return request, queue

    async def answer(self, body: dict, ids: list[int], params: Params, chat: bool) -> Response:
        """The response to a request: one JSON body, or server-sent events with `stream`."""
        stream = _field(body, "stream", (bool,), False)
        options = _field(body, "stream_options", (dict,), {})
        request, queue = self.submit(ids, params)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": self.model_name}  # fmt: skip
        if not stream:
            return await self.whole(request, queue, head, chat)
        events = self.events(request, queue, head, chat, options.get("include_usage") is True)
        return _Stream(events, lambda: self.engine.cancel(request))

    async def whole(self, request: Request, queue: asyncio.Queue, head: dict,
                    chat: bool) -> Response:  # fmt: skip
        """The non-streaming answer, once the request has finished."""
        parts: list[str] = []
        try:
            while (event := await queue.get()).finish is None:
                parts.append(event.text)
        finally:
            self.engine.cancel(request)  # (nothing left to cancel when it has finished)
        self.metrics.finished(request)
        if request.finish == "cancelled":
            raise ApiError(503, "the request was cancelled: the server is shutting down",
                           kind="server_error", code="shutting_down")  # fmt: skip
        if request.finish == "error":
            raise ApiError(500, "generation failed on the device (see the server's log)",
                           kind="server_error")  # fmt: skip
        text = "".join(parts)
        body = {**head, "object": "chat.completion" if chat else "text_completion"}
        if chat:
            message = {"role": "assistant", "content": text}
            body["choices"] = [{"index": 0, "message": message, "logprobs": None,
                                "finish_reason": request.finish}]  # fmt: skip
        else:
            body["choices"] = [_choice(chat, text, request.finish)]
        body["usage"] = _usage(request)
        return JSONResponse(body)

    async def events(self, request: Request, queue: asyncio.Queue, head: dict, chat: bool,
                     include_usage: bool) -> AsyncIterator[str]:  # fmt: skip
        """The streaming answer: a chunk per piece of text, the finish, usage, `[DONE]`."""

        def sse(doc: dict) -> str:
            return f"data: {json.dumps(doc)}\n\n"

        if chat:
            yield sse({**head, "choices": [_choice(chat, None, None, role=True)]})
        while (event := await queue.get()).finish is None:
            if event.text:
                yield sse({**head, "choices": [_choice(chat, event.text, None)]})
        if request.finish == "error":  # an error object mid-stream, as vLLM sends (the openai
            # client raises it)
            failed = ApiError(500, "generation failed on the device (see the server's log)",
                              kind="server_error")  # fmt: skip
            yield sse(failed.body())
            self.metrics.finished(request)
            yield "data: [DONE]\n\n"
            return
        finish = {"cancelled": "abort"}.get(request.finish, request.finish)
        yield sse({**head, "choices": [_choice(chat, None, finish)]})
        self.metrics.finished(request)
        if include_usage:
            yield sse({**head, "choices": [], "usage": _usage(request)})
        yield "data: [DONE]\n\n"

    async def completions(self, http: HttpRequest) -> Response:
        body = await self.read_body(http)
        ids = _prompt_ids(body, self.model)
        params = _params(body, DEFAULT_COMPLETION_TOKENS, self.engine, len(ids))
        return await self.answer(body, ids, params, chat=False)

    async def chat_completions(self, http: HttpRequest) -> Response:
        body = await self.read_body(http)
        messages = _messages(body)
        try:
            ids = self.model.encode(render_chat(self.model, messages))
        except JaxparError as e:
            raise ApiError(400, str(e), "messages") from None
        params = _params(body, max(self.model.context - len(ids), 1), self.engine, len(ids))
        return await self.answer(body, ids, params, chat=True)

    async def models(self, http: HttpRequest) -> Response:
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def one_model(self, http: HttpRequest) -> Response:
        name = http.path_params["name"]
        if name != self.model_name:
            raise ApiError(404, f"the model '{name}' does not exist", "model",
                           code="model_not_found")  # fmt: skip
        return JSONResponse(self.model_card())

    async def health(self, http: HttpRequest) -> Response:
        if self.engine.failed:
            return JSONResponse({"status": "failed", "model": self.model_name,
                                 "error": self.engine.failed}, status_code=503)  # fmt: skip
        return JSONResponse({"status": "ok", "model": self.model_name})

    async def prometheus(self, http: HttpRequest) -> Response:
        return Response(generate_latest(self.metrics.registry),
                        media_type="text/plain; version=0.0.4; charset=utf-8")  # fmt: skip

    def counted(self, endpoint: Callable, name: str) -> Callable:
        """`endpoint` answering its ApiErrors as OpenAI error objects, counted by status."""

        async def handle(http: HttpRequest) -> Response:
            try:
                response = await endpoint(http)
            except ApiError as e:
                response = e.response()
            self.metrics.requests.labels(name, str(response.status_code)).inc()
            return response

        return handle


async def _http_error(http: HttpRequest, exc: HTTPException) -> Response:
    return ApiError(exc.status_code, f"{http.method} {http.url.path}: {exc.detail}",
                    code=None).response()  # fmt: skip


def create_app(engine: Engine, model_name: str, on_shutdown: Callable[[], None] | None = None):
    """The Starlette app serving `engine` as model `model_name`."""
    api = _Api(engine, model_name)
    routes = [
        Route("/v1/completions", api.counted(api.completions, "completions"), methods=["POST"]),
        Route("/v1/chat/completions", api.counted(api.chat_completions, "chat"), methods=["POST"]),
        Route("/v1/models", api.counted(api.models, "models"), methods=["GET"]),
        Route("/v1/models/{name:path}", api.counted(api.one_model, "models"), methods=["GET"]),
        Route("/health", api.health, methods=["GET"]),
        Route("/metrics", api.prometheus, methods=["GET"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        if on_shutdown is not None:
            on_shutdown()

    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error},
                    lifespan=lifespan)  # fmt: skip
    app.state.metrics = api.metrics
    return app


def bind(host: str, port: int):
    """A listening socket on host:port (port 0: a free one), bound before the model loads so
    that a taken port is refused at once.

    Raises:
        JaxparError: the port is out of range or the address cannot be bound.
    """
    import socket

    if not 0 <= port <= 65535:
        raise JaxparError(f"--port {port} must be in [0, 65535] (0: any free port)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise JaxparError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    return sock


def serve(engine: Engine, model_name: str, sock, shutdown_s: float, log=print) -> None:
    """Serves `engine` on the bound socket until SIGTERM or SIGINT: then it stops accepting,
    gives in-flight requests `shutdown_s` seconds to finish, cancels the rest and returns."""
    import signal

    import uvicorn

    host, port = sock.getsockname()[:2]
    app = create_app(engine, model_name, on_shutdown=lambda: engine.close(0))
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=shutdown_s,
                            lifespan="on")  # fmt: skip
    server = uvicorn.Server(config)
    engine.on_failure = lambda: setattr(server, "should_exit", True)
    # uvicorn re-raises the signal that stopped it once it has shut down; with a handler of
    # our own installed, that ends in a clean return (exit code 0) instead of death by signal.
    signal.signal(signal.SIGTERM, lambda *_: None)
    log(f"serving {model_name!r} on http://{host}:{port} ({engine.slots} slots)")
    server.run(sockets=[sock])
    log("stopped")
