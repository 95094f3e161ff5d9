"""Running the app under uvicorn, with two limits uvicorn leaves open: a connection that stalls is closed, and
stopping (SIGTERM, Ctrl-C) waits for requests in flight only so long.

uvicorn closes a keep-alive connection that sits idle between requests, but not one whose request never
finishes arriving (a client that vanished mid-request: a half-open connection, or one that holds sockets on
purpose) nor one whose client stops taking the response. Each would hold a socket, and a streamed one its
generation, for as long as TCP takes to give up (many minutes). `StallGuardedH11Protocol` aborts both after
`stall_timeout` seconds without progress.

    with serve_in_background(app) as url:   # tests and benchmarks: a real server on a free loopback port
        httpx.get(f"{url}/health")
"""
from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Iterator, Optional

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol


class StallGuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, plus one timer: armed while the client owes the rest of a request it
    began (or, on a new connection, its first byte) and restarted by every byte it sends; armed too while the
    response cannot be written because the client takes none of it. When it fires the connection is aborted;
    the app then sees the client gone, which cancels its generation."""

    stall_timeout: float = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._stall: Optional[asyncio.TimerHandle] = None
        super().connection_made(transport)
        self._watch_request()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_request()

    def pause_writing(self) -> None:
        super().pause_writing()
        self._arm()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._watch_request()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _watch_request(self) -> None:
        self._disarm()
        waiting = self.conn.their_state is h11.SEND_BODY or (
            self.conn.their_state is h11.IDLE and self.timeout_keep_alive_task is None)  # (idle between requests:
        if waiting and not self.transport.is_closing():                                 # uvicorn's keep-alive)
            self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._stall = self.loop.call_later(self.stall_timeout, self._stalled)

    def _disarm(self) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None

    def _stalled(self) -> None:
        self._stall = None
        if not self.transport.is_closing():
            self.transport.abort()  # not close(): that would wait to flush what the client does not take


def guarded_protocol(stall_timeout: float) -> type[StallGuardedH11Protocol]:
    """The protocol class for uvicorn's `http=`, closing connections that stall for `stall_timeout` seconds."""
    return type("StallGuardedH11Protocol", (StallGuardedH11Protocol,), {"stall_timeout": float(stall_timeout)})


def server_config(app, host: str, port: int, stall_timeout: float = 30.0,
                  shutdown_timeout: Optional[float] = 30.0) -> uvicorn.Config:
    """uvicorn's configuration for `app`: stalled connections closed, shutdown's wait for requests bounded
    (None = wait for every request to finish)."""
    return uvicorn.Config(app, host=host, port=port, log_level="warning", http=guarded_protocol(stall_timeout),
                          timeout_graceful_shutdown=shutdown_timeout)


@contextlib.contextmanager
def serve_in_background(app, host: str = "127.0.0.1", port: int = 0, stall_timeout: float = 30.0,
                        shutdown_timeout: Optional[float] = 30.0) -> Iterator[str]:
    """Run `app` under uvicorn on a thread (port 0 = any free port); yields its base URL, stops on exit."""
    server = uvicorn.Server(server_config(app, host, port, stall_timeout, shutdown_timeout))
    thread = threading.Thread(target=server.run, name="lorakit-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
