"""The ASGI middleware every request passes: request id, bearer auth, body size, metrics, one log line.

It is plain ASGI (not Starlette's BaseHTTPMiddleware) so that handlers still see the client's
disconnect: the body is read here, under the size limit, and replayed to the app, after which
``receive`` is the server's own again.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid
from typing import Any

log = logging.getLogger("linfusion.serve")

OPEN_PATHS = frozenset({"/healthz", "/readyz"})
"""Probes answer without a token; everything else needs one when a key is configured."""
ENDPOINTS = frozenset({"/v1/images/generations", "/v1/models", "/sdapi/v1/txt2img", "/sdapi/v1/img2img",
                       "/sdapi/v1/progress", "/sdapi/v1/interrupt", "/sdapi/v1/samplers", "/sdapi/v1/sd-models",
                       "/healthz", "/readyz", "/metrics"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class BodyTooLarge(Exception):
    pass


class Gate:
    def __init__(self, app: Any, service: Any) -> None:
        self.app = app
        self.service = service
        self.key = None if service.config.api_key is None else service.config.api_key.encode()
        self.limit = service.config.max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        rid = re.sub(r"[^A-Za-z0-9._-]", "", headers.get("x-request-id", ""))[:64] or uuid.uuid4().hex[:16]
        path = scope.get("path", "")
        state = scope.setdefault("state", {})
        status = [500]

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            if self.key is not None and path not in OPEN_PATHS and not self._authorized(headers):
                await reply(send_with_id, 401, "missing or wrong API key; send 'Authorization: Bearer <key>'",
                            "authentication_error", {"www-authenticate": "Bearer"})
                return
            if scope.get("method") in BODY_METHODS:
                try:
                    body = await self._read_body(headers, receive)
                except BodyTooLarge:
                    await reply(send_with_id, 413, f"request body larger than {self.limit} bytes "
                                                   f"(--max-body-mb); send smaller images", "invalid_request_error")
                    return
                receive = replay(body, receive)
            await self.app(scope, receive, send_with_id)
        finally:
            self._account(rid, path, scope.get("method", ""), status[0], state.get("info") or {},
                          time.perf_counter() - start)

    def _authorized(self, headers: dict[str, str]) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        # compare_digest on bytes: constant time in the token's content
        return hmac.compare_digest(token.strip().encode(), self.key) and scheme.lower() == "bearer"

    async def _read_body(self, headers: dict[str, str], receive: Any) -> bytes:
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            raise BodyTooLarge
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                raise BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    def _account(self, rid: str, path: str, method: str, status: int, info: dict, seconds: float) -> None:
        endpoint = path if path in ENDPOINTS else "other"
        metrics = self.service.metrics
        metrics.requests.labels(endpoint, str(status)).inc()
        metrics.latency.labels(endpoint).observe(seconds)
        if path in ("/metrics", "/healthz", "/readyz", "/sdapi/v1/progress") and status < 400:
            return  # polled endpoints: counted, not logged
        wait = info.get("queue_wait")
        log.info("request id=%s %s %s status=%d size=%s steps=%s images=%s batch=%s queue_wait=%s total=%.3fs",
                 rid, method, endpoint, status, info.get("size", "-"), info.get("steps", "-"),
                 info.get("images", "-"), info.get("batch", "-"), "-" if wait is None else f"{wait:.3f}s", seconds)


def replay(body: bytes, receive: Any) -> Any:
    sent = [False]

    async def replayed() -> dict:
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def reply(send: Any, status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"error": {"message": message, "type": kind}}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
