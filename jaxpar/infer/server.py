"""`jaxpar serve`: the OpenAI HTTP API over the continuous-batching engine.

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (both with `stream: true` as
server-sent events ending in `data: [DONE]`), `GET /v1/models`, `GET /health` and `GET /metrics`
(Prometheus text). Errors are OpenAI error objects, `{"error": {"message", "type", "param",
"code"}}`:
- 400 for a body that is not JSON or whose fields do not check (`jaxpar.infer.protocol`: every
  field's type, range and size), or a request that does not fit the context;
- 401 without a valid key, when the server has keys (`jaxpar.infer.access`);
- 404 for another model's name or an unknown path;
- 413 for a body over `serve.max_body_bytes`, refused before it is read whole;
- 429 when `serve.max_queue` requests already wait;
- 503 for a request that waited `serve.queue_timeout_s` for a slot, or while shutting down.
A client's mistake never reaches the log; the connection stays open for its next request.

Built on Starlette, uvicorn, prometheus-client and pydantic (the `serve` extra).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from jaxpar.config import ServeConfig
from jaxpar.errors import JaxparError
from jaxpar.infer.access import Access, exposure_warning
from jaxpar.infer.chat import render_chat
from jaxpar.infer.engine import check_context
from jaxpar.infer.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    GenerationRequest,
    parse,
)
from jaxpar.infer.sampling import DEFAULT_TEMPERATURE, Sampling
from jaxpar.infer.scheduler import Closed, Engine, Event, Params, QueueFull, Request

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# OpenAI's defaults for a request's fields (its API reference): what a request that omits one gets
# (the temperature's is the engine's `DEFAULT_TEMPERATURE`, the one default of every command).
# A chat completion's `max_tokens` defaults to what the context leaves after the prompt instead.
DEFAULT_COMPLETION_TOKENS = 16  # /v1/completions' max_tokens
DEFAULT_TOP_P = 1.0
DEFAULT_TOP_K = 0  # no limit (vLLM's extension; -1 says the same)


# -- request fields ------------------------------------------------------------------------


def _params(request: GenerationRequest, max_tokens: int, engine: Engine,
            prompt_len: int) -> Params:  # fmt: skip
    """The generation settings of a checked request; `max_tokens` is the default."""
    chat_limit = getattr(request, "max_completion_tokens", None)
    name = "max_completion_tokens" if chat_limit is not None else "max_tokens"
    tokens = getattr(request, name) or max_tokens
    temperature = DEFAULT_TEMPERATURE if request.temperature is None else request.temperature
    top_p = DEFAULT_TOP_P if request.top_p is None else request.top_p
    vocab = engine.model.config.model.vocab
    top_k = request.top_k or DEFAULT_TOP_K
    top_k = 0 if top_k < 0 or top_k >= vocab else top_k  # (all of the vocabulary: no limit)
    stop_ids = request.stop_token_ids or []
    if any(i >= vocab for i in stop_ids):
        raise ApiError(400, f"'stop_token_ids' must be ids in [0, {vocab})", "stop_token_ids")
    params = Params(
        max_tokens=tokens, sampling=Sampling(temperature, top_k, top_p),
        seed=None if request.seed is None else request.seed % (1 << 31), stop=request.stops,
        stop_ids=tuple(stop_ids), ignore_eos=bool(request.ignore_eos),
        speculative=request.speculative is not False,
    )  # fmt: skip
    try:
        check_context(prompt_len, params.max_tokens, engine.model.context, name)
    except JaxparError as e:
        raise ApiError(400, str(e), name, code="context_length_exceeded") from None
    return params


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
        yield CounterMetricFamily("jaxpar_decode_dispatches", "Decode blocks and verify passes",
                                  value=self.engine.decode_blocks)  # fmt: skip
        yield CounterMetricFamily("jaxpar_spec_drafted_tokens", "Tokens drafted (speculative "
                                  "decoding)", value=self.engine.drafted_tokens)  # fmt: skip
        yield CounterMetricFamily("jaxpar_spec_accepted_tokens", "Drafted tokens the target "
                                  "kept", value=self.engine.accepted_tokens)  # fmt: skip


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


def _prompt_ids(request: CompletionRequest, model) -> list[int]:
    """The token ids of a completion request's prompt (a string, or ids)."""
    prompt = request.one_prompt
    ids = model.encode(prompt) if isinstance(prompt, str) else prompt
    if not ids:
        raise ApiError(400, "'prompt' is empty; give at least one token", "prompt")
    return ids


def max_body_bytes(config: ServeConfig, context: int) -> int:
    """`serve.max_body_bytes`, or by default room for a prompt of the whole context as token ids
    (up to 7 bytes each: 6 digits and a comma) or as escaped text, and 1 MiB of the rest."""
    return config.max_body_bytes or 8 * context + (1 << 20)


# The ways a request can end without its text, as answers: (status, type, code, message). A
# request whose client left gets 499 (nginx's "client closed request": no one reads it, the
# metrics count it).
_UNFINISHED = {
    "timeout": (503, "server_error", "queue_timeout",
                "no slot freed up within serve.queue_timeout_s = {timeout:g} s; retry later"),
    "cancelled": (503, "server_error", "shutting_down",
                  "the request was cancelled: the server is shutting down"),
    "error": (500, "server_error", None,
              "generation failed on the device (see the server's log)"),
    "client_closed": (499, "invalid_request_error", "client_closed",
                      "the client closed the connection"),
}  # fmt: skip


class _Api:
    """The endpoints of one app: the engine, the model's name and the metrics they share."""

    def __init__(self, engine: Engine, model_name: str):
        self.engine, self.model_name, self.model = engine, model_name, engine.model
        self.metrics = Metrics(engine)
        self.created = int(time.time())
        self.handoffs: dict[asyncio.AbstractEventLoop, _Handoff] = {}
        self.max_body = max_body_bytes(engine.config, self.model.context)

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created,
                "owned_by": "jaxpar", "max_model_len": self.model.context}  # fmt: skip

    async def read(self, http: HttpRequest, kind: type[GenerationRequest]) -> Any:
        """The request body as a checked `kind`, read up to `serve.max_body_bytes` (413 past
        that, before the rest is read: uvicorn discards it once the answer is sent)."""
        limit = f"serve.max_body_bytes = {self.max_body:,}"
        declared = http.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            raise ApiError(413, f"the request body of {int(declared):,} bytes exceeds {limit}",
                           code="request_too_large")  # fmt: skip
        body, size = bytearray(), 0
        async for chunk in http.stream():
            size += len(chunk)
            if size > self.max_body:
                raise ApiError(413, f"the request body exceeds {limit}", code="request_too_large")
            body += chunk
        request = parse(kind, bytes(body))
        if request.model is not None and request.model != self.model_name:
            message = (f"the model {request.model!r} does not exist; this server serves "
                       f"{self.model_name!r}")  # fmt: skip
            raise ApiError(404, message, "model", code="model_not_found")
        return request

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

    def unfinished(self, request: Request) -> ApiError | None:
        """The error answer of a request that ended without its text (None: it did not)."""
        if request.finish not in _UNFINISHED:
            return None
        status, kind, code, message = _UNFINISHED[request.finish]
        timeout = self.engine.config.queue_timeout_s
        return ApiError(status, message.format(timeout=timeout), kind=kind, code=code)

    async def answer(self, http: HttpRequest, body: GenerationRequest, ids: list[int],
                     params: Params, chat: bool) -> Response:  # fmt: skip
        """The response to a request: one JSON body, or server-sent events with `stream`.

        A stream starts with the request's first event (so that a request that never got a
        slot is answered with its status, not a broken stream); until then, and for a whole
        answer until the end, a client that goes away cancels the request."""
        request, queue = self.submit(ids, params)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": self.model_name}  # fmt: skip
        watch = asyncio.ensure_future(self.watch(http, request))
        try:
            first = await queue.get()
            if not body.stream:
                return await self.whole(request, first, queue, head, chat)
        finally:
            watch.cancel()
            if not body.stream:
                self.engine.cancel(request)  # (nothing left to cancel when it has finished)
        if failed := self.unfinished(request):
            self.metrics.finished(request)
            raise failed
        usage = body.stream_options is not None and body.stream_options.include_usage is True
        events = self.events(request, first, queue, head, chat, usage)
        return _Stream(events, lambda: self.engine.cancel(request))

    async def watch(self, http: HttpRequest, request: Request) -> None:
        """Cancels `request` if its client disconnects (the body is read: the next message is
        the disconnect)."""
        while (await http.receive())["type"] != "http.disconnect":
            pass
        self.engine.cancel(request, reason="client_closed")

    async def whole(self, request: Request, first: Event, queue: asyncio.Queue, head: dict,
                    chat: bool) -> Response:  # fmt: skip
        """The non-streaming answer, once the request has finished."""
        parts = [first.text]
        event = first
        while event.finish is None:
            event = await queue.get()
            parts.append(event.text)
        self.metrics.finished(request)
        if failed := self.unfinished(request):
            raise failed
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

    async def events(self, request: Request, first: Event, queue: asyncio.Queue, head: dict,
                     chat: bool, include_usage: bool) -> AsyncIterator[str]:  # fmt: skip
        """The streaming answer: a chunk per piece of text (the text of every event at hand:
        a decode block's tokens in one), the finish, usage, `[DONE]`."""

        def sse(doc: dict) -> str:
            return f"data: {json.dumps(doc)}\n\n"

        if chat:
            yield sse({**head, "choices": [_choice(chat, None, None, role=True)]})
        event, text = first, ""
        while True:
            text += event.text
            if event.finish is None and not queue.empty():  # a decode block's tokens come
                event = queue.get_nowait()  # together: one chunk of text for all of them
                continue
            if text:
                yield sse({**head, "choices": [_choice(chat, text, None)]})
                text = ""
            if event.finish is not None:
                break
            event = await queue.get()
        if request.finish == "error":  # an error object mid-stream, as vLLM sends (the openai
            # client raises it)
            yield sse(self.unfinished(request).body())
            self.metrics.finished(request)
            yield "data: [DONE]\n\n"
            return
        finish = {"cancelled": "abort", "client_closed": "abort"}.get(request.finish,
                                                                       request.finish)  # fmt: skip
        yield sse({**head, "choices": [_choice(chat, None, finish)]})
        self.metrics.finished(request)
        if include_usage:
            yield sse({**head, "choices": [], "usage": _usage(request)})
        yield "data: [DONE]\n\n"

    async def completions(self, http: HttpRequest) -> Response:
        body = await self.read(http, CompletionRequest)
        ids = _prompt_ids(body, self.model)
        params = _params(body, DEFAULT_COMPLETION_TOKENS, self.engine, len(ids))
        return await self.answer(http, body, ids, params, chat=False)

    async def chat_completions(self, http: HttpRequest) -> Response:
        body = await self.read(http, ChatRequest)
        messages = [{"role": m.role, "content": m.text} for m in body.messages]
        try:
            ids = self.model.encode(render_chat(self.model, messages))
        except JaxparError as e:
            raise ApiError(400, str(e), "messages") from None
        params = _params(body, max(self.model.context - len(ids), 1), self.engine, len(ids))
        return await self.answer(http, body, ids, params, chat=True)

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
        """`endpoint` answering its ApiErrors as OpenAI error objects, counted by status; any
        other exception is the server's fault: logged, and answered 500."""

        async def handle(http: HttpRequest) -> Response:
            try:
                response = await endpoint(http)
            except ApiError as e:
                response = e.response()
            except ClientDisconnect:  # gone while its body was read: no one reads an answer
                response = ApiError(499, "the client closed the connection").response()
            except Exception:
                traceback.print_exc()
                response = ApiError(500, "the server failed on this request (see its log)",
                                    kind="server_error").response()  # fmt: skip
            self.metrics.requests.labels(name, str(response.status_code)).inc()
            return response

        return handle


class _Guard:
    """ASGI middleware that turns away requests without a valid key (`Access`), before the
    app reads anything of them."""

    def __init__(self, app, access: Access, metrics: Metrics):
        self.app, self.access, self.metrics = app, access, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            client = (scope.get("client") or (None,))[0]
            if self.access.needs_key(scope["path"], client):
                authorization = dict(scope["headers"]).get(b"authorization", b"").strip()
                if not self.access.admits(authorization.decode("latin-1")):
                    missing = not authorization
                    message = ("no API key: send the header 'Authorization: Bearer <key>'"
                               if missing else "invalid API key")  # fmt: skip
                    self.metrics.requests.labels("unauthorized", "401").inc()
                    refusal = ApiError(401, message, code="invalid_api_key",
                                       headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
                    await refusal.response()(scope, receive, send)
                    return
        await self.app(scope, receive, send)


async def _http_error(http: HttpRequest, exc: HTTPException) -> Response:
    return ApiError(exc.status_code, f"{http.method} {http.url.path}: {exc.detail}",
                    code=None).response()  # fmt: skip


def create_app(engine: Engine, model_name: str, access: Access | None = None,
               on_shutdown: Callable[[], None] | None = None):  # fmt: skip
    """The ASGI app serving `engine` as model `model_name`, to the clients `access` admits
    (None: to every client)."""
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
    return _Guard(app, access or Access(), api.metrics)


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


def uvicorn_server(app, config: ServeConfig):
    """The uvicorn server of `app`, with TLS when `config` names its files."""
    import uvicorn

    tls = {"ssl_certfile": config.ssl_certfile, "ssl_keyfile": config.ssl_keyfile}
    return uvicorn.Server(uvicorn.Config(
        app, log_level="warning", timeout_graceful_shutdown=config.shutdown_s, lifespan="on",
        **(tls if config.ssl_certfile else {}),
    ))  # fmt: skip


def serve(engine: Engine, model_name: str, sock, access: Access, log=print) -> None:
    """Serves `engine` on the bound socket (with TLS when `engine.config` names its files) until
    SIGTERM or SIGINT: then it stops accepting, gives in-flight requests `serve.shutdown_s`
    seconds to finish, cancels the rest and returns."""
    import signal

    config = engine.config
    host, port = sock.getsockname()[:2]
    if warning := exposure_warning(host, port, access):
        log(warning)
    app = create_app(engine, model_name, access, on_shutdown=lambda: engine.close(0))
    server = uvicorn_server(app, config)
    engine.on_failure = lambda: setattr(server, "should_exit", True)
    # uvicorn re-raises the signal that stopped it once it has shut down; with a handler of
    # our own installed, that ends in a clean return (exit code 0) instead of death by signal.
    signal.signal(signal.SIGTERM, lambda *_: None)
    scheme = "https" if config.ssl_certfile else "http"
    keys = f", {len(access.digests)} API key{'s' * (len(access.digests) > 1)}" if access.locked \
        else ""  # fmt: skip
    log(f"serving {model_name!r} on {scheme}://{host}:{port} ({engine.slots} slots{keys})")
    server.run(sockets=[sock])
    log("stopped")
