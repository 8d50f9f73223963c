"""A real HTTP server on loopback whose answer a test switches, for the http_check tests: a status and body, or
no answer at all (it hangs until switched back or stopped). It counts the requests it received."""

from __future__ import annotations

import asyncio

from aiohttp import web


class Endpoint:
    def __init__(self) -> None:
        self.status = 200
        self.body = b"ok"
        self.requests = 0
        self._hang: asyncio.Event | None = None  # set: answer the requests held
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/health"

    def answer(self, status: int = 200, body: bytes = b"ok") -> None:
        """Answer every request from now on (and those held) with `status` and `body`."""
        self.status, self.body = status, body
        if self._hang is not None:
            self._hang.set()
            self._hang = None

    def hang(self) -> None:
        """Hold every request from now on without answering."""
        if self._hang is None:
            self._hang = asyncio.Event()

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self._hang is not None:
            await self._hang.wait()
        return web.Response(status=self.status, body=self.body)

    async def start(self, port: int = 0) -> Endpoint:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._hang is not None:
            self._hang.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
