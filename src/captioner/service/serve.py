"""REST API: FastAPI on uvicorn, with micro-batching, limits, API keys, A/B variants and feedback.

    captioner serve [--host 127.0.0.1] [--port 8000] [--config serve.toml]

Concurrent requests' photos are gathered into batches (at most `max_batch` photos, the first
waiting at most `max_wait_ms`) and captioned with one encoder pass and one batched beam search per
model variant and search options, by `model_workers` threads at once, each on its own batch.
Uses only the `Captioner` facade.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import queue
import sys
import threading
import time
from collections import Counter
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, TypeVar

import torch
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from captioner import __version__
from captioner.service.ab import ServedModel, live_experiment, load_variants, sticky_assign
from captioner.inference.api import Caption
from captioner.service.config import ServeConfig
from captioner.errors import ImageError, OptionError
from captioner.files import repeated_key
from captioner.service.feedback import (MAX_CORRECTION_CHARS, FeedbackError, FeedbackStore, Served, StoreUnavailable,
                                        text_problem)

log = logging.getLogger("captioner.service.serve")
RETRY_AFTER = {"Retry-After": "1"}  # on 503: the server is busy, not broken


class ApiError(StarletteHTTPException):
    """An error the client gets as JSON: {"error": code, "detail": message}. An HTTPException,
    so that it passes through FastAPI's own body parsing unchanged."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(status, detail, headers)
        self.status, self.code = status, code


def error_response(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


class ErrorBody(BaseModel):
    """Every error's body."""

    error: str = Field(description="a stable code, e.g. unsupported_image, too_many_pixels, unauthorized")
    detail: str = Field(description="what was wrong, naming the photo or field")


def error_docs(*statuses: int) -> dict:
    what = {400: "malformed request", 401: "missing or invalid API key", 404: "unknown model variant or caption",
            408: "the request body stalled or took too long", 413: "body, photo count, pixel count or JPEG scan count over the limit",
            415: "unsupported media type or image format", 422: "invalid field, option or image",
            503: "busy or timed out; retry (Retry-After)"}
    return {s: {"model": ErrorBody, "description": what[s]} for s in statuses}


# --- request and response bodies -------------------------------------------------------------
# Strict types: a JSON true is not a beam size and "3" is not a rating (pydantic's lax mode would
# take both); a field the body does not define is refused, not ignored (a client sending
# `temperature` would otherwise believe it was applied). The server's own limits (maximum
# beam_size, ...) come from its config and are written into /openapi.json by `openapi_limits`.

def _storable(text: str) -> str:
    """Refuse control characters and lone surrogates here, for every string a client sends: the
    stores differ on them (PostgreSQL refuses NUL), the request layer answers the same 422 for both."""
    problem = text_problem(text)
    if problem:
        raise PydanticCustomError("control_character", problem)
    return text


Text = Annotated[StrictStr, AfterValidator(_storable)]


class SearchOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    beam_size: StrictInt = Field(3, ge=1, description="beam width; 1 = greedy")
    max_len: StrictInt = Field(25, ge=1, description="most words per caption")
    n_best: StrictInt = Field(1, ge=1, description="captions returned per photo: the best and its alternatives")
    attention: StrictBool = Field(False, description="also return the words and one attention map per word")
    objects: StrictBool = Field(True, description="name objects the encoder recognises in the caption and list them")
    model: Text | None = Field(None, description="a variant name (see /v1/models); default: the A/B assignment")


class CaptionRequest(SearchOptions):
    images: list[Text] = Field(..., min_length=1, description="base64-encoded photos (JPEG, PNG, WebP, GIF, BMP)")


class Alternative(BaseModel):
    caption: str
    score: float


class RecognizedObjectModel(BaseModel):
    name: str = Field(description="the caption word for what the encoder's ImageNet classifier recognises")
    score: float = Field(description="its probability (summed over the classes with this name)")


class CaptionResult(BaseModel):
    caption_id: str = Field(description="send it back with POST /v1/feedback")
    caption: str
    score: float = Field(description="length-normalised log-probability (higher is better)")
    alternatives: list[Alternative]
    objects: list[RecognizedObjectModel] = Field(
        default_factory=list, description="recognised objects, best first (empty with objects off)")
    model: str
    model_version: str = Field(description="hash of the checkpoint file")
    experiment: str
    variant: str
    words: list[str] | None = None
    attention: list[list[list[float]]] | None = Field(None, description="(words, grid, grid) weights")


class CaptionBatch(BaseModel):
    results: list[CaptionResult]


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    caption_id: Text
    rating: StrictInt | None = Field(None, ge=1, le=5, description="1 (wrong) to 5 (perfect)")
    correction: Text | None = Field(None, max_length=MAX_CORRECTION_CHARS,
                                          description="the caption the photo should have had")


# --- micro-batching --------------------------------------------------------------------------

@dataclass
class Job:
    """One photo waiting for the model."""

    variant: str
    options: tuple[int, int, int, bool]  # (beam_size, max_len, n_best, objects): photos batch only with their equals
    pixels: torch.Tensor  # (3, S, S), preprocessed for this variant's encoder
    future: Future = field(default_factory=Future)


class MicroBatcher:
    """Worker threads that gather jobs into batches and run them. A free worker takes the next
    batch (up to `max_batch` jobs, the first one waiting at most `max_wait_s` for others) and hands
    it to `run`; meanwhile the other workers gather and run their own batches. With one torch
    thread each, `workers` batches are captioned at once on as many cores: torch releases Python's
    lock inside its kernels, and a batch's own steps stay in order in its worker."""

    def __init__(self, run: Callable[[list[Job]], None], max_batch: int, max_wait_s: float, workers: int = 1):
        self.run, self.max_batch, self.max_wait_s, self.workers = run, max_batch, max_wait_s, workers
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._gathering = threading.Lock()  # one worker gathers at a time: batches stay full
        self._threads: list[threading.Thread] = []
        self.batches = 0  # model calls made
        self.images = 0  # photos captioned
        self.largest = 0  # largest batch so far
        self.busy_s = 0.0  # seconds the workers spent in finished model calls (busy() adds the running ones)
        self._running_since: dict[int, float] = {}
        self._count = threading.Lock()

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._loop, name=f"captioner-model-{i}", daemon=True)
                         for i in range(self.workers)]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        if self._threads:
            for _ in self._threads:
                self._queue.put(None)  # one stop signal per worker: each takes one and ends
            deadline = time.monotonic() + 30
            for t in self._threads:
                t.join(timeout=max(deadline - time.monotonic(), 0.0))
            self._threads = []

    def submit(self, job: Job) -> Future:
        self._queue.put(job)
        return job.future

    def pending(self) -> int:
        return self._queue.qsize()

    def busy(self) -> float:
        """Seconds the workers have spent in model calls, the running ones included (busy / uptime:
        how loaded the model is, up to `workers`). Never less than the stage times a finished
        request's client can see."""
        running = list(self._running_since.values())  # read first: a call ending meanwhile is then counted, maybe twice, never not
        now = time.perf_counter()
        return self.busy_s + sum(now - since for since in running)

    def _gather(self, first: Job) -> tuple[list[Job], bool]:
        jobs, deadline = [first], time.monotonic() + self.max_wait_s
        while len(jobs) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:  # past the deadline, still take whatever is already queued
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
        return jobs, False

    def _next_batch(self) -> tuple[list[Job], bool]:
        """The next batch, jobs whose clients gave up left out, and whether to stop after it."""
        with self._gathering:
            first = self._queue.get()
            if first is None:
                return [], True
            jobs, stopping = self._gather(first)
            # A job whose client has given up (timed out) was cancelled: drop it. The others are
            # marked running, so they can no longer be cancelled while the model works on them.
            jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]
            if jobs:  # counted before the model runs: a client holding its caption finds its batch counted
                with self._count:
                    self.batches += 1
                    self.images += len(jobs)
                    self.largest = max(self.largest, len(jobs))
            return jobs, stopping

    def _loop(self) -> None:
        me = threading.get_ident()
        stopping = False
        while not stopping:
            jobs, stopping = self._next_batch()
            if not jobs:
                continue
            t0 = self._running_since[me] = time.perf_counter()
            try:
                self.run(jobs)
            except BaseException as e:  # never leave a client waiting
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(e)
            with self._count:
                self.busy_s += time.perf_counter() - t0
                del self._running_since[me]


def caption_jobs(models: dict[str, ServedModel], jobs: list[Job], encode_chunk: int,
                 add_time: Callable[[str, float], None] = lambda stage, seconds: None) -> None:
    """One encoder pass per variant, then one batched search per (variant, options) group;
    the seconds each takes go to `add_time("encode", s)` and `add_time("search", s)`."""
    by_variant: dict[str, list[Job]] = {}
    for job in jobs:
        by_variant.setdefault(job.variant, []).append(job)
    for name, group in by_variant.items():
        captioner = models[name].captioner
        try:
            t0 = time.perf_counter()
            feats = captioner.encode_pixels(torch.stack([j.pixels for j in group]), chunk=encode_chunk)  # (B, N, C)
            t1 = time.perf_counter()
            add_time("encode", t1 - t0)
            by_options: dict[tuple[int, int, int, bool], list[int]] = {}
            for i, job in enumerate(group):
                by_options.setdefault(job.options, []).append(i)
            done = []
            for (beam_size, max_len, n_best, objects), rows in by_options.items():
                caps = captioner.caption_features(feats[rows], beam_size=beam_size, max_len=max_len, n_best=n_best,
                                                  objects=objects)
                done += [(group[i], cap) for i, cap in zip(rows, caps)]
            add_time("search", time.perf_counter() - t1)
            for job, cap in done:  # after the timings: a client holding its caption sees them counted
                job.future.set_result(cap)
        except Exception as e:
            for job in group:
                if not job.future.done():
                    job.future.set_exception(e)


# --- photos, keys, options -------------------------------------------------------------------

IMAGE_STATUS = {"empty": (422, "empty_image"), "unsupported": (415, "unsupported_image"),
                "too_many_pixels": (413, "too_many_pixels"), "too_many_scans": (413, "too_many_scans"),
                "undecodable": (422, "undecodable_image")}


def image_error(e: ImageError, formats: tuple[str, ...] | None) -> ApiError:
    """The library's image error -> the client's: 413, 415 or 422, naming the photo."""
    status, code = IMAGE_STATUS.get(e.kind, (422, "undecodable_image"))
    detail = str(e)
    if e.kind == "unsupported" and formats and "send one of" not in detail:
        detail += f"; send one of {', '.join(sorted(formats))}"
    return ApiError(status, code, detail)


def key_matches(given: str, keys: list[str]) -> bool:
    """Constant-time check against every key (hashing first makes lengths equal too)."""
    digest = hashlib.sha256(given.encode()).digest()
    ok = False
    for k in keys:
        ok |= hmac.compare_digest(digest, hashlib.sha256(k.encode()).digest())
    return ok


def option_limits(cfg: ServeConfig) -> dict[str, int]:
    """The most each search option may be on this server (checked, and stated in /openapi.json)."""
    return {"beam_size": cfg.max_beam_size, "max_len": cfg.max_len, "n_best": min(cfg.max_n_best, cfg.max_beam_size)}


def check_options(opts: SearchOptions, cfg: ServeConfig) -> None:
    for name, limit in option_limits(cfg).items():
        if name == "n_best":  # above the beam: the error below names both
            limit = cfg.max_n_best
        if getattr(opts, name) > limit:
            raise ApiError(422, "option_out_of_range", f"{name} {getattr(opts, name)} is above this server's limit {limit}")
    if opts.n_best > opts.beam_size:
        raise ApiError(422, "option_out_of_range", f"n_best {opts.n_best} cannot exceed beam_size {opts.beam_size}")


def _form_int(form: Any, name: str, default: int) -> int:
    raw = form.get(name)
    if raw is None or raw == "":
        return default
    if not isinstance(raw, str) or not raw.strip().isdigit() or len(raw.strip()) > 9:
        raise ApiError(422, "invalid_request", f"form field {name}: expected a whole number, got {str(raw)[:40]!r}")
    return int(raw)


FORM_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _form_bool(form: Any, name: str, default: bool) -> bool:
    raw = form.get(name)
    if raw is None or raw == "":
        return default
    if not isinstance(raw, str) or raw.strip().lower() not in FORM_BOOLS:
        raise ApiError(422, "invalid_request", f"form field {name}: expected true or false, got {str(raw)[:40]!r}")
    return FORM_BOOLS[raw.strip().lower()]


class BodyTooLarge(ApiError):
    def __init__(self, limit: int):
        super().__init__(413, "body_too_large", f"request body is larger than this server's limit of {limit} bytes")


class BodyTimeout(ApiError):
    def __init__(self, seconds: float, total: bool = False):
        super().__init__(408, "body_timeout", f"the request body did not arrive within {seconds:g} s" if total
                         else f"the request body stopped arriving for {seconds:g} s")


class BodyLimit:
    """ASGI middleware: refuse a body above `max_bytes` by its Content-Length before reading
    it, stop reading a body without one as soon as it passes the limit, give up on a body
    that stalls for `timeout_s` between chunks, and on one that has not all arrived
    `deadline_s` after the request began (a client trickling a byte a second is never idle
    long enough for the first rule; neither may hold a slot for ever)."""

    def __init__(self, app: Any, max_bytes: int, timeout_s: float = 20.0, deadline_s: float = 25.0):
        self.app, self.max_bytes, self.timeout_s, self.deadline_s = app, max_bytes, timeout_s, deadline_s

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            err = BodyTooLarge(self.max_bytes)
            return await error_response(err.status, err.code, err.detail)(scope, receive, send)
        seen = 0
        started = False
        body_done = False
        deadline = time.monotonic() + self.deadline_s

        async def limited_receive() -> dict:
            nonlocal seen, body_done
            if body_done:  # after the body, receive() only waits for a disconnect: no deadline
                return await receive()
            left = deadline - time.monotonic()
            try:
                message = await asyncio.wait_for(receive(), max(min(self.timeout_s, left), 0.0))
            except asyncio.TimeoutError:
                raise BodyTimeout(self.deadline_s, total=True) if left <= self.timeout_s else \
                    BodyTimeout(self.timeout_s) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
                body_done = not message.get("more_body", False)
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except (BodyTooLarge, BodyTimeout) as err:
            if started:
                raise
            await error_response(err.status, err.code, err.detail)(scope, receive, send)


PUBLIC_PATHS = ("/healthz", "/openapi.json", "/docs")  # and what lies under /docs/: the docs' own assets


def given_key(headers: dict[bytes, bytes]) -> str:
    """The API key a request carries: X-API-Key, or Authorization: Bearer KEY."""
    key = headers.get(b"x-api-key", b"").decode("latin-1")
    auth = headers.get(b"authorization", b"").decode("latin-1")
    return key or (auth[7:].strip() if auth.lower().startswith("bearer ") else "")


class ApiKeyGate:
    """ASGI middleware, outermost: with keys configured, a request without a valid one gets 401
    from its headers alone, before its body is read or parsed and before it takes one of the
    in-flight slots (so keyless clients, slow or not, cannot starve keyed ones). /healthz and
    the API docs stay open."""

    def __init__(self, app: Any, keys: list[str]):
        self.app, self.keys = app, keys

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or not self.keys:
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if path in PUBLIC_PATHS or path.startswith("/docs/"):
            return await self.app(scope, receive, send)
        given = given_key(dict(scope["headers"]))
        if not (given and key_matches(given, self.keys)):
            return await error_response(401, "unauthorized", "missing or invalid API key: send it as X-API-Key or "
                                                             "Authorization: Bearer")(scope, receive, send)
        await self.app(scope, receive, send)


class InFlightLimit:
    """ASGI middleware: at most `limit` requests handled at once; above it, 503 with
    Retry-After before the body is read (load is shed, not queued without bound). /healthz
    is always answered."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit
        self.in_flight = 0  # one event loop: no lock needed

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope.get("path") == "/healthz":
            return await self.app(scope, receive, send)
        if self.in_flight >= self.limit:
            return await error_response(503, "busy", f"the server is handling {self.limit} requests; retry shortly",
                                        RETRY_AFTER)(scope, receive, send)
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


# --- the app ---------------------------------------------------------------------------------

class Service:
    """What the endpoints share: config, loaded variants, batcher, feedback store."""

    def __init__(self, cfg: ServeConfig, models: dict[str, ServedModel], store: FeedbackStore):
        self.cfg, self.models, self.store = cfg, models, store
        self.keys = cfg.keys()
        self.formats = cfg.image_limits().formats
        # photos decoded at once: a 40 MP photo takes ~120 MB while it is decoded
        self.decoding = threading.BoundedSemaphore(cfg.decode_workers)
        # where the time goes: the model workers' encoder passes and searches, and the request
        # threads' photo decoding (many threads add to them: under a lock)
        self.stage_s = {"encode": 0.0, "search": 0.0, "decode": 0.0}
        self.decoded = 0  # photos the request threads decoded (a request's photos after one that fails count too)
        self._timing_lock = threading.Lock()
        self.batcher = MicroBatcher(lambda jobs: caption_jobs(models, jobs, cfg.encode_chunk, self.add_time),
                                    cfg.max_batch, cfg.max_wait_ms / 1000, cfg.model_workers)

    def add_time(self, stage: str, seconds: float) -> None:
        with self._timing_lock:
            self.stage_s[stage] += seconds

    def client(self, request: Request) -> str:
        """The client id for A/B assignment. (ApiKeyGate has checked the key before the body was
        read; it is checked again here so an endpoint never relies on the middleware's order.)"""
        given = given_key({k.lower(): v for k, v in request.headers.raw})
        if self.keys and not (given and key_matches(given, self.keys)):
            raise ApiError(401, "unauthorized", "missing or invalid API key: send it as X-API-Key or "
                                                "Authorization: Bearer")
        cid = request.headers.get("x-client-id")
        if cid:
            return "id:" + cid
        if given:
            return "key:" + given  # hashed before it is stored or used
        return "ip:" + (request.client.host if request.client else "unknown")

    def pick(self, client: str, requested: str | None) -> tuple[ServedModel, bool]:
        """(variant's model, whether the experiment assigned it) for this client: the one it asked
        for, or its sticky assignment, which the store keeps for every replica (blocking: call it
        from a worker thread)."""
        if requested:
            if requested not in self.models:
                raise ApiError(404, "unknown_model",
                               f"no model variant {requested!r}; this server has {', '.join(self.models)}")
            return self.models[requested], False
        try:
            return self.models[sticky_assign(self.store, self.cfg.experiment, client).name], True
        except StoreUnavailable as e:
            raise store_busy(e) from None

    def timed_out(self) -> ApiError:
        return ApiError(503, "timeout", f"the caption was not ready within {self.cfg.request_timeout_s:g} s: "
                                        f"the server is busy; retry shortly", RETRY_AFTER)

    async def within(self, awaitable: Any, deadline: float) -> Any:
        """Await it until the request's deadline; past it the client gets 503 (its queued photos
        are cancelled, so the model never spends time on them)."""
        try:
            return await asyncio.wait_for(awaitable, max(deadline - time.monotonic(), 0.0))
        except asyncio.TimeoutError:
            raise self.timed_out() from None

    async def caption(self, client: str, photos: list[bytes], opts: SearchOptions
                      ) -> list[dict]:
        deadline = time.monotonic() + self.cfg.request_timeout_s
        check_options(opts, self.cfg)
        names = ["image"] if len(photos) == 1 else [f"images[{i}]" for i in range(len(photos))]

        def prepare() -> tuple[ServedModel, bool, list[torch.Tensor]]:
            """The client's variant (a store read), then its photos decoded: one worker-thread hop."""
            served, assigned = self.pick(client, opts.model)
            try:
                served.captioner.check_search(opts.beam_size, opts.max_len, opts.n_best)
            except OptionError as e:
                raise ApiError(422, "option_out_of_range", str(e)) from None
            if not self.decoding.acquire(timeout=max(deadline - time.monotonic(), 0.0)):
                raise self.timed_out()
            t0 = time.perf_counter()
            try:
                out = []
                for data, name in zip(photos, names):
                    try:
                        out.append(served.captioner.preprocess(data, name=name))
                    except ImageError as e:
                        raise image_error(e, self.formats) from None
                return served, assigned, out
            finally:
                self.decoding.release()
                self.add_time("decode", time.perf_counter() - t0)
                with self._timing_lock:
                    self.decoded += len(photos)

        served, assigned, pixels = await self.within(run_in_threadpool(prepare), deadline)
        options = (opts.beam_size, opts.max_len, opts.n_best, opts.objects)
        futures = [self.batcher.submit(Job(served.variant.name, options, p)) for p in pixels]
        caps: list[Caption] = await self.within(asyncio.gather(*(asyncio.wrap_future(f) for f in futures)),
                                                deadline)

        def record() -> list[dict]:
            results = []
            for data, cap in zip(photos, caps):
                cid = self.store.record_caption(Served(
                    "api", client, self.cfg.experiment.name, served.variant.name, assigned,
                    served.captioner.name, served.version, cap.text, cap.score,
                    {"beam_size": opts.beam_size, "max_len": opts.max_len, "n_best": opts.n_best,
                     "objects": opts.objects},
                    data if self.cfg.store_images else None))
                results.append(result_dict(cid, cap, served, self.cfg.experiment.name, opts.attention))
            return results

        try:
            return await run_in_threadpool(record)  # committed before the client hears of it
        except StoreUnavailable as e:
            raise store_busy(e) from None


def store_busy(e: StoreUnavailable) -> ApiError:
    """Busy (locked past the timeout) or unreachable: nothing was stored; the client retries."""
    return ApiError(503, "store_busy", f"{e}", RETRY_AFTER)


def result_dict(caption_id: str, cap: Caption, served: ServedModel, experiment: str, attention: bool) -> dict:
    out = {"caption_id": caption_id, **cap.to_dict(), "model": served.captioner.name,
           "model_version": served.version, "experiment": experiment, "variant": served.variant.name}
    if attention:
        out["words"] = cap.words
        out["attention"] = [[[round(float(w), 5) for w in row] for row in m] for m in cap.attention]
    return out


def caption_body(cfg: ServeConfig) -> dict:
    """The request body of POST /v1/captions, with this server's limits (both forms)."""
    limits = option_limits(cfg)
    return {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["image"],
                "properties": {"image": {"type": "string", "format": "binary"},
                               **{name: {"type": "integer", "default": default, "minimum": 1, "maximum": limits[name]}
                                  for name, default in (("beam_size", 3), ("max_len", 25), ("n_best", 1))},
                               "attention": {"type": "boolean", "default": False},
                               "objects": {"type": "boolean", "default": True},
                               "model": {"type": "string"}}}},
            "application/json": {"schema": {"$ref": "#/components/schemas/CaptionRequest"}},
        },
    }


def openapi_limits(schemas: dict, cfg: ServeConfig) -> None:
    """Write the server's limits into the JSON request's schema: the options' maxima and the
    most photos per request."""
    props = schemas["CaptionRequest"]["properties"]
    for name, limit in option_limits(cfg).items():
        props[name]["maximum"] = limit
    props["images"]["maxItems"] = cfg.max_images


def swagger_assets() -> "Path | None":
    """Swagger UI's files from the pinned swagger-ui-bundle package, or None where it is not
    installed (then /docs is off: the page would otherwise load its code from a public CDN)."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        return None
    from pathlib import Path

    path = Path(str(swagger_ui_path))
    return path if (path / "swagger-ui-bundle.js").is_file() else None


def create_app(cfg: ServeConfig, models: dict[str, ServedModel] | None = None) -> FastAPI:
    """The FastAPI app: loads the experiment's variants (unless given) and opens the store."""
    torch.set_num_threads(cfg.threads)
    store = FeedbackStore(cfg.db, pool_size=cfg.db_pool)  # first: an unreachable database fails fast
    models = models if models is not None else load_variants(cfg.experiment, cfg.model_dir, cfg.image_limits())
    svc = Service(cfg, models, store)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        svc.batcher.start()
        try:
            yield
        finally:
            svc.batcher.stop()
            svc.store.close()

    # /docs is served from local assets (swagger-ui-bundle); /redoc is off: no pinned package
    # ships ReDoc's script, and a page that loads code from a CDN is blank offline
    app = FastAPI(title="captioner", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Photo in, English sentence out. Multipart upload (field `image`) or JSON "
                              "with base64 photos; A/B variants; ratings and corrections.")
    app.state.service = svc
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes, timeout_s=cfg.body_timeout_s,
                       deadline_s=cfg.body_deadline_s)
    app.add_middleware(InFlightLimit, limit=cfg.max_in_flight)  # sheds load before any body is read
    app.add_middleware(ApiKeyGate, keys=svc.keys)  # outermost: keyless requests never take a slot
    assets = swagger_assets()
    if assets is not None:
        from fastapi.openapi.docs import get_swagger_ui_html
        from fastapi.staticfiles import StaticFiles

        app.mount("/docs/assets", StaticFiles(directory=str(assets)), name="docs-assets")

        @app.get("/docs", include_in_schema=False)
        async def docs() -> Any:
            return get_swagger_ui_html(openapi_url="/openapi.json", title="captioner API",
                                       swagger_js_url="/docs/assets/swagger-ui-bundle.js",
                                       swagger_css_url="/docs/assets/swagger-ui.css",
                                       swagger_favicon_url="/docs/assets/favicon-32x32.png",
                                       oauth2_redirect_url=None, swagger_ui_parameters={"validatorUrl": None})

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return error_response(e.status, e.code, e.detail, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid_request", validation_message(e.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, "http_error", str(e.detail), e.headers)

    @app.exception_handler(ClientDisconnect)
    async def gone(request: Request, e: ClientDisconnect) -> JSONResponse:
        # the client hung up before its body arrived: nothing failed here, and nobody reads the answer
        log.info("client disconnected before its request body arrived: %s %s", request.method, request.url.path)
        return error_response(400, "client_disconnected", "the client disconnected before its request body arrived")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        # The traceback goes to the log (with the path, never the headers: no API key in logs);
        # the client gets JSON, not a stack trace.
        log.error("internal error on %s %s: %s", request.method, request.url.path, type(e).__name__,
                  exc_info=e)
        return error_response(500, "internal_error", "the server failed on this request; it was logged")

    @app.get("/healthz")
    async def healthz() -> dict:
        """Liveness, with the batcher's counters and where the time went: the model's encoder
        passes and searches, and the request threads' photo decoding."""
        b, t = svc.batcher, svc.stage_s
        return {"status": "ok", "variants": list(svc.models), "batches": b.batches, "images": b.images,
                "largest_batch": b.largest, "model_workers": b.workers, "model_busy_s": round(b.busy(), 3),
                "queued": b.pending(),
                "encode_s": round(t["encode"], 3), "search_s": round(t["search"], 3),
                "decode_s": round(t["decode"], 3), "photos_decoded": svc.decoded}

    @app.get("/v1/models", responses=error_docs(401, 503))
    async def list_models(request: Request) -> dict:
        """The experiment and its model variants."""
        svc.client(request)
        try:
            state = await run_in_threadpool(svc.store.experiment_state, svc.cfg.experiment.name)
        except StoreUnavailable as e:
            raise store_busy(e) from None
        live = live_experiment(svc.cfg.experiment, state)
        return {"experiment": svc.cfg.experiment.name, "variants": [
            {"name": m.variant.name, "model": m.captioner.name, "version": m.version, "weight": m.variant.weight,
             "status": state.of(m.variant.name), "new_traffic_weight": live.variant(m.variant.name).weight,
             "precision": m.captioner.precision}
            for m in svc.models.values()]}

    @app.post("/v1/captions", openapi_extra={"requestBody": caption_body(cfg)},
              responses={200: {"model": CaptionResult, "description": "multipart: one result; JSON: "
                                                                      "{\"results\": [...]} (CaptionBatch)"},
                         **error_docs(400, 401, 404, 408, 413, 415, 422, 503)})
    async def captions(request: Request) -> dict:
        """Caption one uploaded photo (multipart field `image`) or several base64 photos (JSON)."""
        client = svc.client(request)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            photos, opts = await read_multipart(request)
            return (await svc.caption(client, photos, opts))[0]
        if ctype == "application/json":
            raw, most = await read_json(request), svc.cfg.max_images
            if isinstance(raw, dict) and isinstance(raw.get("images"), list) and len(raw["images"]) > most:
                raise ApiError(413, "too_many_images",
                               f"{len(raw['images'])} images in one request; this server takes at most {most}")
            body = validated(CaptionRequest, raw)
            photos = [decode_base64(s, f"images[{i}]") for i, s in enumerate(body.images)]
            opts = SearchOptions(**body.model_dump(exclude={"images"}))
            return {"results": await svc.caption(client, photos, opts)}
        raise ApiError(415, "unsupported_media_type",
                       f"send multipart/form-data (field 'image') or application/json, not {ctype or 'no type'}")

    @app.post("/v1/feedback", openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": {"$ref": "#/components/schemas/FeedbackRequest"}}}}},
              responses=error_docs(400, 401, 404, 408, 413, 415, 422, 503))
    async def feedback(request: Request) -> dict:
        """Rate a served caption (1-5) and/or correct it."""
        svc.client(request)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in ("", "application/json"):
            raise ApiError(415, "unsupported_media_type", f"send application/json, not {ctype}")
        body = validated(FeedbackRequest, await read_json(request))
        try:
            fid = await run_in_threadpool(svc.store.add_feedback, body.caption_id, body.rating, body.correction)
        except StoreUnavailable as e:  # locked past the busy timeout, or unreachable: nothing was stored
            raise store_busy(e) from None
        except FeedbackError as e:
            status = 404 if "no caption" in str(e) else 422
            raise ApiError(status, "unknown_caption" if status == 404 else "invalid_feedback", str(e)) from None
        return {"feedback_id": fid, "caption_id": body.caption_id}

    def openapi() -> dict:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (CaptionRequest, FeedbackRequest, CaptionResult, CaptionBatch, Alternative, ErrorBody):
                schemas.update(model.model_json_schema(ref_template="#/components/schemas/{model}").pop("$defs", {}))
                schemas[model.__name__] = model.model_json_schema(ref_template="#/components/schemas/{model}")
                schemas[model.__name__].pop("$defs", None)
            openapi_limits(schemas, cfg)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def validation_message(errors: list[dict], model: type[BaseModel] | None = None) -> str:
    """Pydantic's errors in one line, each naming its field; an unknown field also gets the fields
    the body takes."""
    takes = f" (this body takes {', '.join(model.model_fields)})" if model is not None else ""
    return "; ".join(f"{'.'.join(str(x)[:60] for x in e.get('loc', ())) or 'body'}: "
                     + (f"unknown field{takes}" if e.get("type") == "extra_forbidden" else e.get("msg", "invalid"))
                     for e in errors)


FORM_FIELDS = ("image", *SearchOptions.model_fields)  # the upload form's fields: the photo and the options


def check_form_fields(names: list[str]) -> None:
    """An upload form's fields: each known, and each once (which of two values would count?)."""
    for name, times in Counter(names).items():
        if name not in FORM_FIELDS:
            raise ApiError(422, "invalid_request", f"form field {name[:60]!r}: unknown field (the form takes "
                                                   f"{', '.join(FORM_FIELDS)})")
        if times > 1:
            raise ApiError(422, "invalid_request", f"form field {name}: given {times} times; give it once")


async def read_multipart(request: Request) -> tuple[list[bytes], SearchOptions]:
    form = await request.form(max_files=1, max_fields=10)
    upload = form.get("image")
    if upload is None or isinstance(upload, str):
        raise ApiError(422, "invalid_request", "multipart form needs a file field named 'image'")
    check_form_fields([name for name, _ in form.multi_items()])
    data = await upload.read()
    try:
        opts = SearchOptions(beam_size=_form_int(form, "beam_size", 3), max_len=_form_int(form, "max_len", 25),
                             n_best=_form_int(form, "n_best", 1), attention=_form_bool(form, "attention", False),
                             objects=_form_bool(form, "objects", True),
                             model=(str(form["model"]) if form.get("model") else None))
    except ValidationError as e:
        raise ApiError(422, "invalid_request", validation_message(e.errors())) from None
    return [data], opts


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """A JSON object whose keys are all different: parsers disagree on which of two values counts."""
    twice = repeated_key(pairs)
    if twice is not None:
        raise ApiError(422, "invalid_request", f"{twice[:60]}: field given more than once; give it once")
    return dict(pairs)


async def read_json(request: Request) -> Any:
    """The body as JSON, refused (422) where it is not JSON or an object repeats a field."""
    try:
        return json.loads(await request.body(), object_pairs_hook=_unique_keys)
    except ValueError as e:
        raise ApiError(422, "invalid_request", f"body is not valid JSON: {e}") from None
    except RecursionError:  # '[[[[...' nested deeper than the parser recurses
        raise ApiError(422, "invalid_request", "body is not valid JSON: nested too deeply") from None


Body = TypeVar("Body", bound=BaseModel)


def validated(model: type[Body], raw: Any) -> Body:
    """The parsed body as `model`, or 422 naming each field that is wrong."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ApiError(422, "invalid_request", validation_message(e.errors(), model)) from None


def decode_base64(text: str, name: str) -> bytes:
    if text.startswith("data:") and "," in text:  # a data URL: keep what follows the comma
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "invalid_base64", f"{name}: not valid base64") from None


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """glibc gives threads their own malloc arenas, and memory freed in one stays mapped there:
    with a pool of request threads the server's RSS creeps up under steady load. Two arenas keep
    it flat (benchmarks/soak.py measured both). An explicit MALLOC_ARENA_MAX wins; elsewhere than
    glibc this does nothing. Returns whether the limit was set."""
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(-8, arenas))  # -8: M_ARENA_MAX
    except (OSError, AttributeError):
        return False


def run(cfg: ServeConfig) -> None:
    """Serve until interrupted."""
    import uvicorn

    limit_malloc_arenas()

    uvicorn.run(create_app(cfg), host=cfg.host, port=cfg.port, log_level="info",
                timeout_keep_alive=cfg.keep_alive_s, limit_concurrency=cfg.max_connections,
                timeout_graceful_shutdown=10, server_header=False)
