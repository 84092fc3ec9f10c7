"""A request's life in the service: its deadline (SEG_TIMEOUT after its body is in), the client going away,
the server's stop signal, the errors with their own status codes, and the one place errors become JSON."""

from __future__ import annotations

import contextvars
import functools
import signal
import threading
import time
from typing import Callable

from starlette.responses import JSONResponse

from seg.errors import SegError

STOPPING = threading.Event()  # set by SIGTERM or SIGINT: running predictions stop at their next tile batch

DEADLINE: contextvars.ContextVar[float] = contextvars.ContextVar("deadline")  # set by the gate once the body is in
GONE: contextvars.ContextVar[threading.Event] = contextvars.ContextVar("gone")  # set when the client disconnects


class TooLarge(SegError):
    """An image with more pixels than the server takes."""


class TimedOut(SegError):
    """A request past its deadline."""


class ClientGone(SegError):
    """The client disconnected: nobody reads the answer, so the work stops."""


class ShuttingDown(SegError):
    """A request still running when the server was told to stop."""


STATUS = {TooLarge: 413, ClientGone: 499, ShuttingDown: 503, TimedOut: 504}  # any other SegError: 400


def client_errors(endpoint):
    """The one place where errors become responses: by `STATUS`, any other SegError 400, as JSON."""

    @functools.wraps(endpoint)
    def answer(*args, **kwargs):
        try:
            return endpoint(*args, **kwargs)
        except SegError as err:
            return JSONResponse({"error": str(err)}, status_code=STATUS.get(type(err), 400))

    return answer


def request_check(timeout: float) -> Callable[[], None]:
    """The current request's `check` for the predictor, called between tile batches: raises ShuttingDown once
    the server is stopping, ClientGone once the client has disconnected (its work stops there) and TimedOut
    past the request's DEADLINE."""
    deadline = DEADLINE.get(None) or time.monotonic() + timeout

    gone = GONE.get(None)

    def check() -> None:
        if STOPPING.is_set():
            raise ShuttingDown("the server is shutting down; send the request again")
        if gone is not None and gone.is_set():
            raise ClientGone("the client went away")
        if time.monotonic() > deadline:
            raise TimedOut(f"not answered within {timeout:g} seconds (SEG_TIMEOUT)")

    return check


def stop_on_signals() -> None:
    """Make SIGTERM and SIGINT set STOPPING, then call the handler already installed (uvicorn's, which lets
    running requests finish before the worker exits: they now stop at their next tile batch)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for number in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(number)
        if not callable(previous):  # no server's handler to hand on to
            continue

        def handler(signum, frame, previous=previous) -> None:
            STOPPING.set()
            previous(signum, frame)

        signal.signal(number, handler)


def header_deadline(seconds: float) -> None:
    """Close a connection whose first request's headers are not all in `seconds` after it opened. Uvicorn,
    which BentoML runs, has no such deadline: a client sending its headers a byte at a time held its
    connection for ever. (Later requests on a kept-alive connection have uvicorn's keep-alive timeout.)"""
    import importlib

    for module, name in (("uvicorn.protocols.http.h11_impl", "H11Protocol"),
                         ("uvicorn.protocols.http.httptools_impl", "HttpToolsProtocol")):  # fmt: skip
        try:
            protocol = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):  # httptools is optional
            continue
        if getattr(protocol, "header_deadline", None) is not None:
            continue

        def connection_made(self, transport, *args, _original=protocol.connection_made, **kwargs):
            _original(self, transport, *args, **kwargs)

            def expire() -> None:
                if self.cycle is None and not transport.is_closing():
                    transport.close()

            self.loop.call_later(seconds, expire)

        protocol.connection_made, protocol.header_deadline = connection_made, seconds
