"""`coplctl serve`: a loaded run behind an HTTP JSON API (Starlette application, served by uvicorn).

    POST /reward   {"items": [{"user": "u1", "prompt": "...", "response": "..."}, ...]}
                   -> 200 {"rewards": [0.12, ...], "scores": (the same), "method": "copl"}
    POST /reward   {"query": [prompt + response, ...], "prompts": [prompt, ...], "labels": [user, ...]}
                   -> 200 {"rewards": [...], "scores": [...], "method": "copl"}   (OpenRLHF's remote reward
                   model client, ``--remote_rm_url http://HOST:PORT/reward``: the user id is each sample's
                   label (``--label_key``), the response is the query after its prompt)
    POST /users    {"pairs": [{"user": "alice", "chosen": "<response id or text>", "rejected": "...",
                   "prompt": "(for new texts)"}, ...]}   (a user file's records)
                   -> 200 {"users": 1, "pairs": 4, "total_users": 121, "report": {...}}: the new users are
                   adapted, scored by /reward at once, and stored in the run's overlay
                   (:mod:`coplctl.serving.overlay`), so a restarted server knows them too
    GET  /health   -> 200 {"status": "ok"}
    GET  /info     -> 200 {"method", "run", "users", "mode", "backbone", "max_batch", "max_body_bytes", "version"}

Errors are JSON ``{"error": "..."}`` naming the item and field: 400 (not JSON, or not an object with
``items``), 403 (``/users`` on a server without an overlay), 404/405, 413 (body over ``max_body_bytes``,
more than ``max_batch`` items or ``max_user_pairs`` pairs), 422 (a field missing or not a text, an unknown
user, a pair that names no response, a user the run already has), 507 (the overlay could not be written).
Requests run one at a time (the model is not shared between threads), off the event loop.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version

from coplctl.core.errors import CoplError
from coplctl.core.files import not_unicode


class _Problem(Exception):
    def __init__(self, status: int, message: str):
        self.status, self.message = status, message


def _text(value, where: str) -> str:
    if not isinstance(value, str):
        raise _Problem(422, f"{where} " + ("is missing" if value is None else "must be a text"))
    problem = not_unicode(value)
    if problem:
        raise _Problem(422, f"{where} {problem}")
    return value


def _openrlhf(data: dict, max_batch: int) -> tuple[list[str], list[str], list[str]]:
    """(users, prompts, responses) of OpenRLHF's request: each query is its prompt followed by the response."""
    cols = {k: data.get(k) for k in ("query", "prompts", "labels")}
    for k, v in cols.items():
        if not isinstance(v, list):
            raise _Problem(422, f"{k} must be a list" + (" (the user id of each sample: OpenRLHF's --label_key)"
                                                           if k == "labels" else ""))
    n = len(cols["query"])
    if not n or len(cols["prompts"]) != n or len(cols["labels"]) != n:
        raise _Problem(422, f"query, prompts and labels must be non-empty lists of one length ({n}, "
                            f"{len(cols['prompts'])}, {len(cols['labels'])})")
    if n > max_batch:
        raise _Problem(413, f"{n} queries, more than this server's max batch of {max_batch}")
    users, prompts, responses = [], [], []
    for i in range(n):
        query, prompt = _text(cols["query"][i], f"query[{i}]"), _text(cols["prompts"][i], f"prompts[{i}]")
        if not query.startswith(prompt):
            raise _Problem(422, f"query[{i}] does not start with prompts[{i}]; the response is the query after its prompt")
        users.append(_text(cols["labels"][i], f"labels[{i}]"))
        prompts.append(prompt)
        responses.append(query[len(prompt):])
    return users, prompts, responses


def _items(body: bytes, max_batch: int) -> tuple[list[str], list[str], list[str]]:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise _Problem(400, "the body is not valid JSON") from None
    if isinstance(data, dict) and "query" in data:
        return _openrlhf(data, max_batch)
    if not isinstance(data, dict) or not isinstance(data.get("items"), list):
        raise _Problem(400, 'the body must be a JSON object {"items": [{"user", "prompt", "response"}, ...]} '
                            '(or OpenRLHF\'s {"query", "prompts", "labels"})')
    items = data["items"]
    if not items:
        raise _Problem(422, "items is empty")
    if len(items) > max_batch:
        raise _Problem(413, f"{len(items)} items, more than this server's max batch of {max_batch}")
    cols: dict[str, list[str]] = {"user": [], "prompt": [], "response": []}
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise _Problem(422, f"items[{i}] must be an object with user, prompt and response")
        for key, values in cols.items():
            values.append(_text(item.get(key), f"items[{i}].{key}"))
    return cols["user"], cols["prompt"], cols["response"]


def _pairs(body: bytes, max_pairs: int) -> list[dict]:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise _Problem(400, "the body is not valid JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("pairs"), list):
        raise _Problem(400, 'the body must be a JSON object {"pairs": [{"user", "chosen", "rejected", "prompt"}, ...]}')
    pairs = data["pairs"]
    if not pairs:
        raise _Problem(422, "pairs is empty")
    if len(pairs) > max_pairs:
        raise _Problem(413, f"{len(pairs)} pairs, more than this server's limit of {max_pairs} per request")
    for i, rec in enumerate(pairs):
        if not isinstance(rec, dict):
            raise _Problem(422, f"pairs[{i}] must be an object with user, chosen and rejected")
        for key, value in rec.items():
            if isinstance(value, str) and not_unicode(value):
                raise _Problem(422, f"pairs[{i}].{key} {not_unicode(value)}")
    return pairs


def make_app(rm, *, max_batch: int = 1024, max_body_bytes: int = 8 << 20, overlay=None, max_user_pairs: int = 1000):
    """The ASGI application serving ``rm`` (a :class:`coplctl.serving.api.RewardModel`); ``overlay`` (an opened
    :class:`coplctl.serving.overlay.Overlay`) stores the users ``POST /users`` adds (None: refused)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    lock = asyncio.Lock()
    cfg = rm.method.config
    info = {"method": rm.name, "run": str(rm.run), "mode": getattr(cfg, "mode", None),
            "backbone": getattr(cfg, "backbone", None), "max_batch": max_batch, "max_body_bytes": max_body_bytes,
            "version": version("coplctl")}

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise _Problem(413, f"the body is {int(declared):,} bytes, over this server's limit of {max_body_bytes:,}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                raise _Problem(413, f"the body is over this server's limit of {max_body_bytes:,} bytes")
        return bytes(body)

    async def reward(request: Request) -> JSONResponse:
        try:
            body = await read_body(request)
        except ClientDisconnect:  # the client left mid-body: nobody to answer, nothing to log
            return JSONResponse({"error": "the client disconnected"}, status_code=400)
        except _Problem as p:
            return JSONResponse({"error": p.message}, status_code=p.status)
        try:
            users, prompts, responses = _items(body, max_batch)
            async with lock:
                scores = await run_in_threadpool(rm.reward, users, prompts, responses)
        except _Problem as p:
            return JSONResponse({"error": p.message}, status_code=p.status)
        except CoplError as e:  # e.g. an unknown user
            return JSONResponse({"error": str(e)}, status_code=422)
        rewards = [float(s) for s in scores]
        return JSONResponse({"rewards": rewards, "scores": rewards, "method": rm.name})

    async def users(request: Request) -> JSONResponse:
        if overlay is None:
            return JSONResponse({"error": "this server takes no new users (started with --read-only)"}, status_code=403)
        try:
            records = _pairs(await read_body(request), max_user_pairs)
            async with lock:
                report = await run_in_threadpool(overlay.add, rm, records)
        except ClientDisconnect:
            return JSONResponse({"error": "the client disconnected"}, status_code=400)
        except _Problem as p:
            return JSONResponse({"error": p.message}, status_code=p.status)
        except CoplError as e:  # a bad record (named by its row), a user the run has
            return JSONResponse({"error": str(e)}, status_code=422)
        except OSError as e:
            return JSONResponse({"error": f"the new users are served until a restart, but storing them in "
                                          f"{overlay.directory} failed: {e.strerror or e}"}, status_code=507)
        report = json.loads(json.dumps(report, default=str))
        return JSONResponse({"users": report.get("users"), "pairs": len(records), "total_users": len(rm.users),
                             "report": report})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def about(request: Request) -> JSONResponse:
        return JSONResponse({**info, "users": len(rm.users)})

    async def http_error(request: Request, exc) -> JSONResponse:  # 404, 405: JSON like every other answer
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    return Starlette(routes=[Route("/reward", reward, methods=["POST"]), Route("/users", users, methods=["POST"]),
                             Route("/health", health),
                             Route("/info", about)], exception_handlers={404: http_error, 405: http_error})


def check_port(host: str, port: int) -> None:
    """A busy port or an unknown host as one CoplError (uvicorn would log several lines and exit with 3)."""
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as e:
        raise CoplError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port or --host") from None


def serve(rm, *, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 1024,
          max_body_bytes: int = 8 << 20, log_level: str = "info", overlay=None, max_user_pairs: int = 1000) -> None:
    """Serve ``rm`` until interrupted (``overlay``: an opened :class:`coplctl.serving.overlay.Overlay`)."""
    import uvicorn

    check_port(host, port)
    uvicorn.run(make_app(rm, max_batch=max_batch, max_body_bytes=max_body_bytes, overlay=overlay,
                         max_user_pairs=max_user_pairs), host=host, port=port, log_level=log_level)


@contextmanager
def in_background(app, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread (port 0: a free one) for the block; yields the base URL."""
    import socket
    import threading
    import time

    import uvicorn

    if port == 0:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise CoplError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
