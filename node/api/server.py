"""An OpenAI-compatible HTTP API, a live fleet dashboard and Prometheus metrics, on one port.

Served by Hypercorn's trio worker with Starlette (ASGI on trio through anyio), in a node process
(``idlefleet node --api-port PORT``) or a client-only process (``idlefleet api --bootstrap ADDR``),
or over the whole model in this process (``idlefleet api --local``).

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (streaming
as server-sent events ending with ``data: [DONE]``), ``GET /metrics`` (Prometheus), ``GET /`` (the
dashboard), ``GET /api/fleet`` (its data as JSON) and ``GET /api/events`` (the same, pushed as
server-sent events).

Generation reuses the project's own code paths: :class:`~idlefleet.node.model.generate.Generation`
over the local stage (as ``idlefleet generate --local``), or
:class:`~idlefleet.node.client.FleetGeneration` across the fleet (as ``--bootstrap``), so greedy
output equals ``idlefleet generate`` token for token. Tokens travel from the generating task to
the HTTP response through a memory channel (never a ``yield`` inside a cancel scope); a task
watches ``receive()`` for ``http.disconnect`` (Hypercorn's trio worker does not report it through
``Request.is_disconnected``) and cancels the generation at once, which closes its sessions on the
stage servers.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from idlefleet.node.api.openai_compat import (
    ApiError,
    CompletionRequest,
    StopScanner,
    bad_request,
    chunk_object,
    completion_object,
    models_object,
    new_id,
    parse_request,
    usage_chunk,
)
from idlefleet.node.client.config import ClientModel, GenerationFailed
from idlefleet.node.client.fleet import FleetClient
from idlefleet.node.client.generation import FleetGeneration
from idlefleet.node.model import local
from idlefleet.node.model.generate import Generation
from idlefleet.node.model.sampling import SamplingParams
from idlefleet.node.model.stage import Stage
from idlefleet.node.model.tokenizer import TextStream
from idlefleet.node.runtime.node import Node
from idlefleet.node.serve.server import ServerConfig
from idlefleet.protocols.errors import ModelError
from idlefleet.protocols.routing import NoRoute

log = logging.getLogger(__name__)

MODEL_ALIAS = "default"  # accepted for the one model this server has (its id is a long hash)
DASHBOARD_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
                   "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
                   "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8")}


@dataclass(frozen=True)
class ApiConfig:
    host: str = "127.0.0.1"
    port: int = 8000  # 0 = any free port (the bound address is returned by serve_api)
    default_max_tokens: int = 256  # when a request gives no max_tokens
    ping_s: float = 5.0  # a ": ping" comment on a stream that waited this long for a token
    retry_after_s: int = 5  # Retry-After of a 503 while the fleet does not cover the model
    max_body_bytes: int = 1 << 20
    dashboard_interval_s: float = 1.0  # /api/events pushes a snapshot this often
    max_event_streams: int = 32  # concurrent /api/events clients
    graceful_timeout_s: float = 2.0


# -- backends: where the blocks run ------------------------------------------------------------
OnToken = Callable[[int], Awaitable[None]]


class Backend:
    """Runs generations for the API. ``model`` is the client's part (tokenizer, embedding, head)."""

    node: Node | None = None
    model: ClientModel
    max_prompt_tokens: int

    @property
    def context_length(self) -> int:
        return int(self.model.head.config.context_length)

    def check_ready(self) -> None:
        """Raise ApiError(503) when a generation cannot start now."""

    async def generate(self, prompt_ids: list[int], params: SamplingParams, on_token: OnToken,
                       job: Job) -> str:
        """Generate, awaiting ``on_token(id)`` per new token; return the stop reason
        (``stop_token`` or ``length``). Cancellation stops at once and releases every resource.
        Raises GenerationFailed when the blocks cannot be run."""
        raise NotImplementedError


class LocalBackend(Backend):
    """Every block in this process: the loop of ``idlefleet generate --local``, one step at a time
    in a worker thread (so HTTP and heartbeats keep running), one generation at a time."""

    def __init__(self, model: ClientModel, stage: Stage) -> None:
        self.model = model
        self.stage = stage
        self.max_prompt_tokens = self.context_length
        self._lock = trio.Lock()  # one KV cache's compute at a time: the cores are shared
        self._limiter = trio.CapacityLimiter(1)

    @classmethod
    def load(cls, model: str | None) -> LocalBackend:
        tokenizer, head, stage = local.load_local(model)
        return cls(ClientModel(stage.model_id, stage.end, tokenizer, head), stage)

    async def generate(self, prompt_ids: list[int], params: SamplingParams, on_token: OnToken,
                       job: Job) -> str:
        gen = Generation(self.model.head, prompt_ids, params, self.model.tokenizer.stop_ids)
        cache = self.stage.new_cache(capacity=len(prompt_ids) + params.max_new_tokens)

        def step() -> int:
            inp = gen.next_input()
            return gen.feed(self.stage.forward(inp.hidden, cache, inp.position))

        async with self._lock:
            while not gen.done:
                await on_token(await trio.to_thread.run_sync(step, limiter=self._limiter))
        return gen.stop_reason or "length"


class FleetBackend(Backend):
    """Blocks on the fleet's stage servers, through a :class:`FleetClient` of ``node``."""

    def __init__(self, node: Node, client: FleetClient | None = None) -> None:
        self.node: Node = node
        self.client = client
        # One prefill is one step: a stage server refuses steps longer than this.
        self.max_prompt_tokens = ServerConfig().max_step_tokens

    @property
    def model(self) -> ClientModel:  # type: ignore[override]
        if self.client is None:
            raise ApiError(503, "the model is still loading", type="service_unavailable",
                           code="model_loading", headers={"Retry-After": "2"})
        return self.client.model

    async def load(self, model_path: str | None) -> None:
        self.client = await FleetClient.create(self.node, model_path)

    def check_ready(self) -> None:
        client = self.client
        if client is None:
            raise ApiError(503, "the model is still loading", type="service_unavailable",
                           code="model_loading", headers={"Retry-After": "2"})
        try:
            client.find_route()
        except NoRoute as e:
            raise ApiError(503, f"the fleet does not cover the model now: {e}", type="service_unavailable",
                           code="fleet_not_ready") from None

    async def generate(self, prompt_ids: list[int], params: SamplingParams, on_token: OnToken,
                       job: Job) -> str:
        assert self.client is not None  # check_ready passed
        # Strict: an HTTP client (streaming or not) only ever gets verified tokens; a stream holds
        # each token until the remote work it depends on is verified (node/client/verifier.py).
        generation = FleetGeneration(self.client, prompt_ids, params, strict=True)
        tokens = generation.run()
        try:
            async for token, _piece in tokens:  # text is assembled by the caller
                if generation.pipeline is not None:
                    job.route = generation.pipeline.route
                if token >= 0:
                    await on_token(token)
        finally:
            await tokens.aclose()  # closes the sessions, also when cancelled
            if generation.pipeline is not None:
                stats = generation.pipeline.statistics()
                job.bytes_sent, job.bytes_received = stats.bytes_sent, stats.bytes_received
        assert generation.result is not None  # set when run() completes
        return generation.result.stop_reason


# -- bookkeeping ------------------------------------------------------------------------------
@dataclass
class Job:
    """One request's generation, as the dashboard and metrics see it."""

    id: str
    endpoint: str
    prompt_tokens: int
    max_tokens: int
    stream: bool
    started: float = field(default_factory=time.monotonic)
    new_ids: list[int] = field(default_factory=list)
    route: list[dict[str, Any]] = field(default_factory=list)
    bytes_sent: int = 0
    bytes_received: int = 0
    finish_reason: str | None = None
    error: Exception | None = None

    def summary(self, now: float) -> dict[str, Any]:
        elapsed = now - self.started
        return {"id": self.id, "endpoint": self.endpoint, "stream": self.stream,
                "prompt_tokens": self.prompt_tokens, "tokens": len(self.new_ids),
                "max_tokens": self.max_tokens, "elapsed_s": round(elapsed, 2),
                "tokens_per_s": round(len(self.new_ids) / elapsed, 2) if elapsed > 0 else 0.0,
                "route": self.route}


@dataclass
class ApiStatistics:
    requests: dict[tuple[str, int], int] = field(default_factory=dict)  # (endpoint, status) -> n
    generations: dict[str, int] = field(default_factory=dict)  # outcome -> n
    prompt_tokens: int = 0
    completion_tokens: int = 0
    bytes_sent: int = 0  # hidden states this process sent to stage servers
    bytes_received: int = 0
    recent: list[tuple[float, int]] = field(default_factory=list)  # (monotonic, tokens) of finished

    def count_request(self, endpoint: str, status: int) -> None:
        self.requests[endpoint, status] = self.requests.get((endpoint, status), 0) + 1

    def finished(self, job: Job, outcome: str) -> None:
        self.generations[outcome] = self.generations.get(outcome, 0) + 1
        self.prompt_tokens += job.prompt_tokens
        self.completion_tokens += len(job.new_ids)
        self.bytes_sent += job.bytes_sent
        self.bytes_received += job.bytes_received
        self.recent.append((time.monotonic(), len(job.new_ids)))
        del self.recent[:-256]


# -- the application --------------------------------------------------------------------------
class ApiServer:
    """The ASGI application and its state. ``app`` is the Starlette app; serve with
    :func:`serve_api`."""

    def __init__(self, backend: Backend, config: ApiConfig = ApiConfig()) -> None:
        from idlefleet.node.api.metrics import build_registry

        self.backend = backend
        self.config = config
        self.stats = ApiStatistics()
        self.jobs: dict[str, Job] = {}
        self.started = time.time()
        self._event_streams = 0
        self.registry = build_registry(self)
        self.app = Starlette(routes=[
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/api/fleet", self.fleet, methods=["GET"]),
            Route("/api/events", self.events, methods=["GET"]),
            *[Route(path, self.static, methods=["GET"]) for path in DASHBOARD_FILES],
        ], exception_handlers={404: self._not_found, 405: self._not_allowed})

    # -- endpoints ---------------------------------------------------------------------------
    async def models(self, request: Request) -> Response:
        try:
            return JSONResponse(models_object(self.backend.model.model_id, self.started))
        except ApiError as e:
            return self._error(e, "models")

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._complete(request, chat=True)

    async def metrics(self, request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    async def fleet(self, request: Request) -> Response:
        from idlefleet.node.api.metrics import fleet_snapshot

        return JSONResponse(fleet_snapshot(self))

    async def events(self, request: Request) -> Response:
        if self._event_streams >= self.config.max_event_streams:
            return self._error(ApiError(503, "too many dashboard streams", type="service_unavailable",
                                        code="too_many_streams",
                                        headers={"Retry-After": str(self.config.retry_after_s)}), "events")
        return SnapshotStream(self)

    async def static(self, request: Request) -> Response:
        name, media_type = DASHBOARD_FILES[request.url.path]
        data = (resources.files("idlefleet.node.api") / "dashboard" / name).read_bytes()
        return Response(data, media_type=media_type, headers={"Cache-Control": "no-cache"})

    async def _not_found(self, request: Request, exc: Exception) -> Response:
        return self._error(ApiError(404, f"no such endpoint: {request.url.path}", code="not_found"), "other")

    async def _not_allowed(self, request: Request, exc: Exception) -> Response:
        return self._error(ApiError(405, f"{request.method} is not allowed on {request.url.path}",
                                    code="method_not_allowed"), "other")

    def _error(self, e: ApiError, endpoint: str) -> Response:
        self.stats.count_request(endpoint, e.status)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    # -- completions -------------------------------------------------------------------------
    async def _read_json(self, request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.config.max_body_bytes:
            raise ApiError(413, f"the body exceeds {self.config.max_body_bytes} bytes", code="body_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.config.max_body_bytes:
                raise ApiError(413, f"the body exceeds {self.config.max_body_bytes} bytes",
                               code="body_too_large")
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise bad_request(f"the body is not valid JSON: {e}", code="invalid_json") from None

    async def _complete(self, request: Request, *, chat: bool) -> Response:
        endpoint = "chat" if chat else "completions"
        try:
            req = parse_request(await self._read_json(request), chat=chat)
            backend = self.backend
            model = backend.model
            if req.model not in (model.model_id, MODEL_ALIAS):
                raise ApiError(404, f"the model {req.model!r} does not exist; this server has "
                                    f"{model.model_id!r} (alias {MODEL_ALIAS!r})", code="model_not_found",
                               param="model")
            prompt_ids = self._encode(req)
            params = self._params(req, len(prompt_ids))
            backend.check_ready()
        except ApiError as e:
            if e.status == 503:
                e.headers.setdefault("Retry-After", str(self.config.retry_after_s))
            return self._error(e, endpoint)
        job = Job(new_id("chatcmpl" if chat else "cmpl"), endpoint, len(prompt_ids),
                  params.max_new_tokens, req.stream)
        self.stats.count_request(endpoint, 200)
        return Completion(self, req, job, prompt_ids, params)

    def _encode(self, req: CompletionRequest) -> list[int]:
        tok = self.backend.model.tokenizer
        try:
            text = tok.apply_chat_template(req.messages) if req.chat else req.prompt
        except ModelError as e:
            raise bad_request(str(e), param="messages") from None
        ids = tok.encode(text)
        if not ids:
            raise bad_request("the prompt is empty", param="prompt")
        return ids

    def _params(self, req: CompletionRequest, prompt_tokens: int) -> SamplingParams:
        limit = min(self.backend.context_length, self.backend.max_prompt_tokens + 1)
        room = self.backend.context_length - prompt_tokens
        if prompt_tokens > self.backend.max_prompt_tokens or room < 1:
            raise bad_request(f"the prompt has {prompt_tokens} tokens; at most {limit - 1} fit",
                              param="messages" if req.chat else "prompt", code="context_length_exceeded")
        max_tokens = min(self.config.default_max_tokens, room) if req.max_tokens is None else req.max_tokens
        if max_tokens > room:
            raise bad_request(f"{prompt_tokens} prompt tokens + max_tokens {max_tokens} exceed the "
                              f"model's context of {self.backend.context_length}", param="max_tokens",
                              code="context_length_exceeded")
        return SamplingParams(max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                              seed=req.seed)

    async def run_job(self, req: CompletionRequest, job: Job, prompt_ids: list[int], params: SamplingParams,
                      on_text: Callable[[str, list[int]], Awaitable[None]],
                      on_idle: Callable[[], Awaitable[None]] | None = None) -> None:
        """Generate ``job``: ``on_text(text, new_ids)`` as safe text becomes available (text never
        includes a stop string), ``on_idle()`` after ``ping_s`` without a token. Sets
        ``job.finish_reason`` or ``job.error``. Cancellation stops the generation at once."""
        self.jobs[job.id] = job
        outcome = "cancelled"
        text = TextStream(self.backend.model.tokenizer)
        scanner = StopScanner(req.stop)
        send, receive = trio.open_memory_channel[int](0)  # the generator waits for the response

        async def produce() -> None:
            async with send:
                try:
                    job.finish_reason = await self.backend.generate(prompt_ids, params, send.send, job)
                except (GenerationFailed, ApiError) as e:
                    job.error = e

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(produce)
                async with receive:
                    while True:
                        with trio.move_on_after(self.config.ping_s) as idle:
                            try:
                                token = await receive.receive()
                            except trio.EndOfChannel:
                                break
                        if idle.cancelled_caught:
                            if on_idle is not None:
                                await on_idle()
                            continue
                        job.new_ids.append(token)
                        await on_text(scanner.push(text.push(token)), [token])
                        if scanner.stopped:
                            job.finish_reason = "stop"
                            nursery.cancel_scope.cancel()  # stops the generation: its sessions close
                            break
            if job.error is None:
                tail = scanner.push(text.flush())
                tail += scanner.flush()
                if scanner.stopped or job.finish_reason == "stop_token":
                    job.finish_reason = "stop"
                if tail:
                    await on_text(tail, [])
            outcome = "failed" if job.error is not None else "completed"
        finally:
            del self.jobs[job.id]
            self.stats.finished(job, outcome)
            log.info("%s %s: %d+%d tokens, %s", job.endpoint, job.id, job.prompt_tokens,
                     len(job.new_ids), outcome if job.error is None else f"failed: {job.error}")


def _sse(data: Any) -> bytes:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def _watch_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    """Cancel ``scope`` as soon as the client goes away (Hypercorn's trio worker reports it only
    through ``receive()``)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


class Completion(Response):
    """The response of a completion request: runs the generation while it is being sent."""

    def __init__(self, server: ApiServer, req: CompletionRequest, job: Job, prompt_ids: list[int],
                 params: SamplingParams) -> None:
        super().__init__()
        self.server, self.req, self.job, self.prompt_ids, self.params = server, req, job, prompt_ids, params
        self.scope: Scope = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scope = scope
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_disconnect, receive, nursery.cancel_scope)
            try:
                await (self._stream(send) if self.req.stream else self._whole(send))
            except* OSError:  # the client went away while we were sending (trio wraps it)
                log.debug("%s: the client went away", self.job.id)
            nursery.cancel_scope.cancel()
        job = self.job
        if nursery.cancel_scope.cancelled_caught and job.finish_reason is None and job.error is None:
            log.info("%s %s: client disconnected after %d tokens; generation cancelled",
                     self.job.endpoint, self.job.id, len(self.job.new_ids))

    async def _whole(self, send: Send) -> None:
        req, job = self.req, self.job
        pieces: list[str] = []

        async def on_text(text: str, _ids: list[int]) -> None:
            pieces.append(text)

        await self.server.run_job(req, job, self.prompt_ids, self.params, on_text)
        if job.error is not None:
            e = job.error if isinstance(job.error, ApiError) else ApiError(
                503, f"the fleet could not finish the generation: {job.error}", type="service_unavailable",
                code="fleet_unavailable", headers={"Retry-After": str(self.server.config.retry_after_s)})
            reply = JSONResponse(e.body(), status_code=e.status, headers=e.headers)
            await reply(self.scope, _no_receive, send)
            return
        body = completion_object(req, job.id, int(time.time()), "".join(pieces),
                                 job.finish_reason or "length", self.prompt_ids, job.new_ids)
        await JSONResponse(body)(self.scope, _no_receive, send)

    async def _stream(self, send: Send) -> None:
        req, job = self.req, self.job
        created = int(time.time())
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no")]})

        async def write(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})

        if req.chat:
            await write(_sse(chunk_object(req, job.id, created, text="", role=True, token_ids=[])))

        async def on_text(text: str, ids: list[int]) -> None:
            if text or (ids and req.return_token_ids):
                await write(_sse(chunk_object(req, job.id, created, text=text, token_ids=ids)))

        async def on_idle() -> None:
            await write(b": ping\n\n")

        await self.server.run_job(req, job, self.prompt_ids, self.params, on_text, on_idle)
        if job.error is not None:
            e = job.error if isinstance(job.error, ApiError) else ApiError(
                503, f"the fleet could not finish the generation: {job.error}", type="service_unavailable",
                code="fleet_unavailable")
            await write(_sse(e.body()))
        else:
            await write(_sse(chunk_object(req, job.id, created, text="" if not req.chat else None,
                                          finish_reason=job.finish_reason or "length")))
            if req.include_usage:
                await write(_sse(usage_chunk(req, job.id, created, len(self.prompt_ids), len(job.new_ids))))
        await write(b"data: [DONE]\n\n")
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class SnapshotStream(Response):
    """``/api/events``: the dashboard's data as a server-sent event every ``dashboard_interval_s``."""

    def __init__(self, server: ApiServer) -> None:
        super().__init__()
        self.server = server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        from idlefleet.node.api.metrics import fleet_snapshot

        server = self.server
        server._event_streams += 1
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch_disconnect, receive, nursery.cancel_scope)
                try:
                    await send({"type": "http.response.start", "status": 200, "headers": [
                        (b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"cache-control", b"no-cache")]})
                    while True:
                        data = _sse(fleet_snapshot(server))
                        await send({"type": "http.response.body", "body": data, "more_body": True})
                        await trio.sleep(server.config.dashboard_interval_s)
                except OSError:
                    nursery.cancel_scope.cancel()
        finally:
            server._event_streams -= 1


async def _no_receive() -> dict[str, Any]:
    await trio.sleep_forever()
    raise AssertionError("unreachable")


# -- serving ----------------------------------------------------------------------------------
async def serve_api(server: ApiServer, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``server`` until cancelled; ``task_status.started(url)`` once listening (the real
    port when ``config.port`` is 0). Raises OSError if the address is taken."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    cfg = server.config
    hc = Config()
    hc.bind = [f"{cfg.host}:{cfg.port}"]
    hc.graceful_timeout = cfg.graceful_timeout_s
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")

    async def _serve(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        await serve(server.app, hc, task_status=task_status)  # type: ignore[arg-type]  # ASGI types

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(_serve)
        url = binds[0] if binds else f"http://{cfg.host}:{cfg.port}"
        log.info("HTTP API on %s/v1, dashboard on %s/, metrics on %s/metrics", url, url, url)
        task_status.started(url)


async def serve_node_api(node: Node, config: ApiConfig, model_path: str | None = None, *,
                         task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """The API of a running node (``idlefleet node --api-port``): listens at once (503 until the
    client's part of the model is loaded), generates across the fleet the node sees."""
    backend = FleetBackend(node)
    server = ApiServer(backend, config)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_api, server)
        task_status.started(url)
        await backend.load(model_path)


def tokens_per_s(recent: Sequence[tuple[float, int]], jobs: Sequence[Job], now: float,
                 window_s: float = 10.0) -> float:
    """Tokens per second generated over the last ``window_s``: finished jobs plus running ones."""
    done = sum(n for t, n in recent if now - t <= window_s)
    running = sum(len(j.new_ids) * min(1.0, window_s / max(now - j.started, 1e-9)) for j in jobs)
    return round((done + running) / window_s, 2) if math.isfinite(done + running) else 0.0
