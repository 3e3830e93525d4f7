"""The HTTP service (``sigma serve``): FastAPI over one :class:`~sigmarec.serving.runtime.Runtime`.

* The run is loaded once, on a background thread started by the lifespan handler: ``/healthz``
  answers at once, ``/readyz`` is 503 until the model is loaded (and names the error if loading
  failed), every ``/v1`` endpoint that needs the model is 503 until then.
* ``POST /v1/recommend`` and ``/v1/recommend/batch`` are checked in the event loop (a bad
  request never reaches the model) and then micro-batched (:mod:`~sigmarec.serving.batching`)
  into one :meth:`Runtime.rank` call on the model thread.
* A pure ASGI guard in front of the app enforces ``max_body_bytes`` (413) and
  ``max_concurrency`` (503 with ``Retry-After``) and records the Prometheus metrics.
* Every error is ``{"error": {"field": ..., "message": ...}}`` with a 4xx status naming the field
  at fault (``k``, ``history[3]``, ``requests[1].task``, ``body``); an unexpected exception is a
  500 of the same shape, logged, and the process keeps serving.
"""

# No `from __future__ import annotations`: FastAPI and pydantic read the annotations of the
# routes and models defined inside create_app / request_models, which name local variables.

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from sigmarec.config import SigmaConfig
from sigmarec.core.seed import set_threads
from sigmarec.errors import SigmaError
from sigmarec.serving.batching import MicroBatcher
from sigmarec.serving.config import ServiceConfig
from sigmarec.serving.metrics import ServiceMetrics
from sigmarec.serving.request import RecItem, RecRequest, RequestError, Resolved
from sigmarec.serving.runtime import Runtime

log = logging.getLogger("sigmarec")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

ID_CHARS = 200  # item / user ids, task and model names, category names


# ---------------------------------------------------------------------------------- schemas
class ErrorDetail(BaseModel):
    field: str | None = Field(description="the request field at fault (null: not one field)")
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class RecResponse(BaseModel):
    model: str
    task: str = Field(description="the task the request was read as")
    params: dict[str, Any] = Field(description="the task's parameters (query, category...)")
    instruction: str = Field(description="the request line of the prompt")
    items: list[RecItem]


class BatchResponse(BaseModel):
    results: list[RecResponse]


class ItemInfo(BaseModel):
    item_id: str
    title: str | None = None
    category_path: str | None = None
    brand: str | None = None
    text: str | None = None
    prefix: str = Field(description="the item's semantic-ID prefix token(s)")
    added_after_training: bool


class HistoryItem(BaseModel):
    item_id: str
    text: str


class UserHistory(BaseModel):
    user_id: str
    profile: str
    total: int = Field(description="items in the whole history (data and later events)")
    items: list[HistoryItem] = Field(description="the most recent ones, oldest first")


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "loading", "failed"]
    detail: str | None = None
    models: list[str] = Field(default_factory=list)
    tasks: list[str] = Field(default_factory=list)
    n_items: int | None = None


def request_models(svc: ServiceConfig) -> tuple[type[BaseModel], type[BaseModel]]:
    """The request bodies, with the configured limits in their schema."""
    item_id = Annotated[str, Field(min_length=1, max_length=ID_CHARS)]

    class RecommendBody(BaseModel):
        """A known ``user_id`` or an explicit ``history`` (+ ``profile``); a ``task`` or a
        free-text ``instruction``; ``k``; filters; the model."""

        model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
            {"user_id": "1003", "task": "JustForYou", "k": 5},
            {"history": ["1000050", "1000329"], "profile": {"age": "35-44"},
             "instruction": "find potato chips", "k": 3, "exclude_bought": True},
        ]})

        user_id: str | None = Field(None, min_length=1, max_length=ID_CHARS)
        history: list[item_id] | None = Field(
            None, max_length=svc.max_history, description="item ids, oldest first")
        profile: dict[Annotated[str, Field(max_length=ID_CHARS)],
                      Annotated[str, Field(max_length=ID_CHARS)]] | None = Field(
            None, max_length=64, description="profile column -> value")
        task: str | None = Field(None, max_length=ID_CHARS)
        instruction: str | None = Field(None, max_length=svc.max_instruction_chars)
        k: int = Field(10, ge=1, description="items to return (at most the catalogue size)")
        category: str | None = Field(
            None, max_length=ID_CHARS, description="a category name at any level or 'A > B'")
        exclude_bought: bool = False
        allow_items: list[item_id] | None = Field(None, max_length=100_000)
        model: str = Field("sigma", max_length=ID_CHARS,
                           description="sigma or a baseline of the run")

    class BatchBody(BaseModel):
        model_config = ConfigDict(extra="forbid")
        requests: list[RecommendBody] = Field(min_length=1, max_length=svc.max_batch_requests)

    return RecommendBody, BatchBody


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": why} for code, why in (
        (400, "malformed JSON"), (404, "unknown item, user or path"),
        (405, "method not allowed on the path"), (413, "body too large"),
        (422, "a field is invalid (the error names it)"),
        (503, "still loading, or too many requests in flight"))}


# ---------------------------------------------------------------------------------- state
class _Service:
    def __init__(self, run_dir: Path, cfg: SigmaConfig, runtime: Runtime | None,
                 on_load_failure: Callable[[str], None] | None = None) -> None:
        self.run_dir = run_dir
        self.cfg = cfg
        self.runtime = runtime
        self.error: str | None = None
        self.on_load_failure = on_load_failure
        self.metrics = ServiceMetrics()
        svc = cfg.serving.service
        # The model thread gets the run's thread count (``threads``; faiss keeps it per
        # thread): on a busy machine, more threads than free cores make every small op wait
        # at a barrier for a descheduled thread (measured 50x slower on the tiny model).
        self.batcher: MicroBatcher[Resolved, list[RecItem]] = MicroBatcher(
            self._rank, svc.max_batch_size, svc.max_wait_ms, self.metrics.observe_batch,
            initializer=lambda: set_threads(cfg.threads))
        if runtime is not None:
            self.metrics.ready.set(1)

    def _rank(self, batch: list[Resolved]) -> list[list[RecItem]]:
        assert self.runtime is not None
        return self.runtime.rank(batch)

    def load(self) -> None:
        t0 = time.perf_counter()
        try:
            self.runtime = Runtime.load(self.run_dir, self.cfg)
        except Exception as e:  # reported by /readyz and to on_load_failure
            self.error = f"{type(e).__name__}: {e}"
            if isinstance(e, SigmaError):  # a user error names its fix: one line says it all
                log.error("serving: cannot load %s: %s", self.run_dir, self.error)
            else:
                log.exception("serving: cannot load %s: %s", self.run_dir, self.error)
            if self.on_load_failure is not None:
                self.on_load_failure(self.error)
            return
        self.metrics.load_seconds.set(time.perf_counter() - t0)
        self.metrics.ready.set(1)

    def require(self) -> Runtime:
        if self.runtime is None:
            raise _Unavailable(self.error or "the model is still loading")
        return self.runtime

    async def watch(self, every_s: float) -> None:
        """Reload when new events or added items are published (cheap when nothing changed)."""
        while True:
            await asyncio.sleep(every_s)
            if self.runtime is None:
                continue
            try:
                if await asyncio.to_thread(self.runtime.reload):
                    log.info("serving: reloaded %s (new events or items)", self.run_dir)
            except Exception:  # a half-published file must not stop the service
                log.exception("serving: reload of %s failed; serving the previous state",
                              self.run_dir)


class _Unavailable(Exception):
    pass


def _error(status: int, field: str | None, message: str,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"field": field, "message": message}}, status_code=status,
                        headers=headers)


def _field_of(loc: tuple[Any, ...] | list[Any]) -> str:
    """pydantic's error location as a field path: ("body", "history", 3) -> "history[3]"."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


# ---------------------------------------------------------------------------------- guard
class _Guard:
    """Body-size and concurrency limits and request metrics, in front of the whole app."""

    def __init__(self, app: Any, service: _Service, routes: Callable[[], list[Any]]) -> None:
        self.app = app
        self.service = service
        self.routes = routes
        svc = service.cfg.serving.service
        self.max_body = svc.max_body_bytes
        self.max_in_flight = svc.max_concurrency
        self.in_flight = 0

    def _endpoint(self, scope: Scope) -> str:
        for route in self.routes():
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return route.path
        return "other"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        metrics = self.service.metrics
        endpoint, method = self._endpoint(scope), scope["method"]
        status = [500]
        t0 = time.perf_counter()

        async def send_status(msg: dict[str, Any]) -> None:
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        async def reply(resp: Response) -> None:
            await resp(scope, receive, send_status)

        limited = endpoint.startswith("/v1/")
        counted = False
        try:
            if limited and self.in_flight >= self.max_in_flight:
                metrics.rejected.labels("concurrency").inc()
                await reply(_error(503, None, f"more than {self.max_in_flight} requests in "
                                   "flight (serving.service.max_concurrency); retry shortly",
                                   {"Retry-After": "1"}))
                return
            body = await self._body(scope, receive)
            if body is None:
                metrics.rejected.labels("body_size").inc()
                await reply(_error(413, "body", f"the body exceeds {self.max_body} bytes "
                                   "(serving.service.max_body_bytes)"))
                return
            if limited:
                self.in_flight += 1
                counted = True
            metrics.in_flight.inc()
            sent = False

            async def replay() -> dict[str, Any]:
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            try:
                await self.app(scope, replay, send_status)
            finally:
                metrics.in_flight.dec()
        finally:
            if counted:
                self.in_flight -= 1
            metrics.observe_request(endpoint, method, status[0], time.perf_counter() - t0)

    async def _body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole body, or None when it exceeds the limit (declared or streamed)."""
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    if int(value) > self.max_body:
                        return None
                except ValueError:
                    pass
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                break
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return None
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        return b"".join(chunks)


# ---------------------------------------------------------------------------------- app
def create_app(run_dir: Path, cfg: SigmaConfig, runtime: Runtime | None = None,
               on_load_failure: Callable[[str], None] | None = None) -> FastAPI:
    """The service over ``run_dir``; a ``runtime`` already loaded (tests) skips the loading.
    ``on_load_failure(reason)`` is called when loading fails (``sigma serve`` stops then)."""
    svc = cfg.serving.service
    service = _Service(Path(run_dir), cfg, runtime, on_load_failure)
    RecommendBody, BatchBody = request_models(svc)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.batcher.start()
        if service.runtime is None:
            # A daemon thread: /healthz answers while the model loads, and a shutdown during
            # the load does not wait for it.
            threading.Thread(target=service.load, name="sigma-load", daemon=True).start()
        watcher = (asyncio.create_task(service.watch(svc.reload_every_s))
                   if svc.reload_every_s > 0 else None)
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            await service.batcher.stop()

    app = FastAPI(title="sigmarec", version="1", lifespan=lifespan,
                  summary="SIGMA and the run's baselines over HTTP (see docs/serving.md)")
    app.state.service = service

    @app.exception_handler(RequestError)
    async def _bad_request(request: Request, e: RequestError) -> JSONResponse:
        return _error(422, e.field, e.message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0]
        if err.get("type") == "json_invalid":
            return _error(400, "body", f"malformed JSON: {err.get('ctx', {}).get('error', '')}"
                          .rstrip(": "))
        return _error(422, _field_of(err.get("loc", ())), str(err.get("msg", "invalid")))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own refusals (an undecodable body, an unknown path or method) in the same
        # shape as every other error, naming what is at fault.
        headers = dict(e.headers or {})
        path = request.url.path
        if e.status_code == 404:
            return _error(404, "path", f"no endpoint {path} (the API is listed at /docs)",
                          headers)
        if e.status_code == 405:
            allowed = headers.get("Allow") or headers.get("allow") or "another method"
            return _error(405, "method", f"{request.method} is not allowed on {path}; use "
                          f"{allowed}", headers)
        return _error(e.status_code, "body" if e.status_code == 400 else None, str(e.detail),
                      headers)

    @app.exception_handler(_Unavailable)
    async def _unavailable(request: Request, e: _Unavailable) -> JSONResponse:
        return _error(503, None, str(e), {"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception) -> JSONResponse:
        # Starlette re-raises after sending this, so the server logs the traceback once.
        return _error(500, None, f"internal error ({type(e).__name__}); see the service log")

    def _response(rt: Runtime, r: Resolved, items: list[RecItem]) -> RecResponse:
        return RecResponse(model=r.model, task=r.task, params=r.params,
                           instruction=r.instruction, items=items)

    @app.post("/v1/recommend", response_model=RecResponse, responses=ERRORS,
              tags=["recommend"])
    async def recommend(body: RecommendBody) -> RecResponse:  # type: ignore[valid-type]
        """Recommend ``k`` items for one request (micro-batched with concurrent ones)."""
        rt = service.require()
        resolved = rt.resolve(RecRequest(**body.model_dump()))
        return _response(rt, resolved, await service.batcher.submit(resolved))

    @app.post("/v1/recommend/batch", response_model=BatchResponse, responses=ERRORS,
              tags=["recommend"])
    async def recommend_batch(body: BatchBody) -> BatchResponse:  # type: ignore[valid-type]
        """Several requests at once; every one is checked before any is ranked."""
        rt = service.require()
        resolved = []
        for i, one in enumerate(body.requests):
            try:
                resolved.append(rt.resolve(RecRequest(**one.model_dump())))
            except RequestError as e:
                raise RequestError(f"requests[{i}].{e.field}", e.message) from None
        lists = await service.batcher.submit_many(resolved)
        return BatchResponse(results=[_response(rt, r, items)
                                      for r, items in zip(resolved, lists, strict=True)])

    @app.get("/v1/items/{item_id}", response_model=ItemInfo, responses=ERRORS, tags=["catalogue"])
    async def item(item_id: str) -> ItemInfo:
        """One item of the catalogue (trained or added after training)."""
        rt = service.require()
        try:
            info = rt.item_info(rt.item_idx(item_id))
        except RequestError as e:
            return _error(404, "item_id", e.message)  # type: ignore[return-value]
        return ItemInfo(**{k: (None if v is None else str(v)) if k in (
            "title", "category_path", "brand", "text") else v
            for k, v in info.items() if k in ItemInfo.model_fields})

    @app.get("/v1/users/{user_id}/history", response_model=UserHistory, responses=ERRORS,
             tags=["catalogue"])
    async def history(user_id: str, limit: Annotated[int, Query(
            ge=1, le=svc.max_history, description="most recent items to list")] = 50
                      ) -> UserHistory:
        """A known user's profile line and purchase history (data, then later events)."""
        rt = service.require()
        try:
            u = rt.user_idx(user_id)
        except RequestError as e:
            return _error(404, "user_id", e.message)  # type: ignore[return-value]
        hist = rt.user_history(u)
        tail = hist[-limit:]
        ids = rt.item_ids
        return UserHistory(user_id=user_id, profile=rt.profile_of(u), total=int(len(hist)),
                           items=[HistoryItem(item_id=str(ids[i]), text=rt.describe(int(i)))
                                  for i in tail])

    @app.get("/healthz", response_model=Health, tags=["operations"])
    async def healthz() -> Health:
        """The process is up (the model may still be loading)."""
        return Health(status="ok")

    @app.get("/readyz", response_model=Readiness, tags=["operations"],
             responses={503: {"model": Readiness, "description": "loading or failed"}})
    async def readyz() -> Any:
        """Ready once the model is loaded; 503 (loading, or failed with the reason) before."""
        rt = service.runtime
        if rt is None:
            state = "failed" if service.error else "loading"
            return JSONResponse(Readiness(status=state, detail=service.error).model_dump(),
                                status_code=503)
        return Readiness(status="ready", models=rt.model_names, tasks=rt.task_names,
                         n_items=rt.n_items)

    @app.get("/metrics", tags=["operations"], response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text format"}})
    async def metrics() -> Response:
        """Request counts and latencies by endpoint and status, micro-batch sizes."""
        payload, content_type = service.metrics.render()
        return Response(payload, media_type=content_type)

    _add_u2i(app, service)
    app.add_middleware(_Guard, service=service, routes=lambda: app.router.routes)
    return app


class U2IItem(BaseModel):
    rank: int
    item_id: str
    score: float


class U2IResponse(BaseModel):
    user_id: str
    task: str
    model: str
    version: int = Field(description="the store version the list was published in")
    published_at: str
    items: list[U2IItem]


def _add_u2i(app: FastAPI, service: _Service) -> None:
    """``GET /v1/u2i/{user_id}?task=``: the lists the nearline job published to the U2I store
    (read straight from the store: no model needed, so it answers while the model loads)."""
    from sigmarec.serving.store import open_store

    state: dict[str, Any] = {}

    def read(user_id: str, task: str) -> Any:
        if "store" not in state:
            state["store"] = open_store(service.cfg.serving.u2i_store, service.run_dir)
        return state["store"].get(user_id, task)

    @app.get("/v1/u2i/{user_id}", response_model=U2IResponse, responses=ERRORS, tags=["u2i"])
    async def u2i(user_id: str, task: Annotated[str, Query(
            max_length=ID_CHARS, description="the task the list was computed for")] = "JustForYou"
                  ) -> Any:
        """The list the nearline job last published for this user and task."""
        entry = await asyncio.to_thread(read, user_id, task)
        if entry is None:
            return _error(404, "user_id", f"no list for user {user_id!r} and task {task!r} "
                          "in the U2I store (see `sigma nearline`)")
        return U2IResponse(user_id=entry.user_id, task=entry.task, model=entry.model,
                           version=entry.version, published_at=entry.published_at,
                           items=[U2IItem(rank=r, item_id=str(i), score=float(sc)) for r, (i, sc)
                                  in enumerate(zip(entry.items, entry.scores, strict=True), 1)])
