"""The gateway's limits: request body size (ASGI middleware, 413 with a JSON body, before or
while reading) and how far behind its event loop runs (`LoopLag`, for shedding with 429)."""

from __future__ import annotations

import asyncio
import time

import orjson


class LoopLag:
    """How late the event loop runs what is due: the time a request waits in the gateway before
    any handler code runs (reading its socket, parsing it, its task's turn), which no deadline
    timer started in the handler can see. Measured the way Node's `toobusy` does it: a timer
    every `interval_s`, and how late it fires.

    `current_s()` is the last measurement, or, when the next timer is already overdue, how
    overdue it is: under a sudden flood the lag shows at once, not one late timer later.
    """

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.last_s = 0.0
        self.due = time.perf_counter() + interval_s
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start measuring on the running loop."""
        self._task = asyncio.get_running_loop().create_task(self._measure())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def current_s(self) -> float:
        return max(self.last_s, time.perf_counter() - self.due)

    async def _measure(self) -> None:
        while True:
            self.due = time.perf_counter() + self.interval_s
            await asyncio.sleep(self.interval_s)
            self.last_s = max(0.0, time.perf_counter() - self.due)


class BodySizeLimit:
    """Refuse bodies over `max_bytes`: by Content-Length up front, or as chunks arrive. In the
    streamed case the 413 is sent from here the moment the limit is crossed; the app then sees
    the client disconnect, and whatever it answers is dropped."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        seen = 0
        started = refused = False

        async def counting_receive():
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    refused = True
                    if not started:
                        await self._refuse(send)
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message):
            nonlocal started
            if refused:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counting_receive, tracking_send)

    async def _refuse(self, send) -> None:
        body = orjson.dumps(
            {
                "error": {
                    "code": "body_too_large",
                    "message": f"request body over {self.max_bytes} bytes",
                    "details": {"max_bytes": self.max_bytes},
                }
            }
        )
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
