"""What a connection may hold: a deadline on every request's headers, a cap on open connections, and an accept
loop that outlives running out of file descriptors.

uvicorn closes an idle keep-alive connection only after a response, and a connection that sends a byte now and
then cancels even that timer. So connections that open and never finish a request line and headers stay open for
good: about 1,100 of them exhausted a server's file descriptors (the default limit is 1,024), after which valid
requests timed out and the accept loop spun. With this protocol a connection that has not begun a request within
the deadline of opening, or of its last response, is closed.

Every connection holds a descriptor, so open connections are also capped below the soft file limit
(`connection_cap`): at the cap a new connection closes the one that has waited longest for a request's headers,
so a flood of silent connections cannot lock valid clients out; when every connection is busy with a request the
newcomer is answered 503 and closed. `GuardedEventLoop` accepts a few connections per turn of the loop (asyncio
accepts the whole backlog in one go, before any protocol can close the surplus), so a burst of connections stays
within the spare descriptors and a valid request behind it is answered. Should the process run out of descriptors
all the same (files opened by something else), asyncio's accept loop (Python 3.11 here) does not stop at the failing
accept(): it tries again for the rest of its batch (stock asyncio: 2,048), logging a traceback and scheduling a retry
each time (CPython issue 151615). That spun a core and wrote megabytes of log a second. `AcceptGuard`, the loop's
exception handler in `GuardedServer`, accepts and closes the waiting connections on a descriptor kept spare, so
that loop ends at once, and logs one line per interval. uvloop is not used even where installed: it closes the
listening socket for good on such an error when libuv's own spare descriptor does not suffice.

A client that shuts its sending side after a request (`nc -N`) is answered if the answer comes within
HALF_CLOSE_GRACE_S (`GuardedH11Protocol.eof_received`).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import math
import os
import resource
import socket
import sys
import time
from typing import Any, ClassVar

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol, RequestResponseCycle

# Kept free of connections: for what the process opens while it serves (the event loop's own descriptors,
# AcceptGuard's spare, modules imported late, log files) and for the connections accepted before the protocol has
# closed the surplus (see ACCEPT_BATCH).
MIN_SPARE_DESCRIPTORS = 32
SPARE_SHARE = 1 / 8  # of the file limit
# Connections accepted per turn of the event loop: those over the cap free their descriptors some three turns later,
# so at most about 4 * ACCEPT_BATCH are open over it, well within the spare descriptors.
ACCEPT_BATCH = 4
OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_BUSY_BODY = json.dumps({"error": "every connection is busy with a request; retry later"}).encode()
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
        b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))
# How long a request whose client has shut its sending side may take to be answered: a client that hung up looks
# the same, and its generation should stop soon (a streamed one stops at the first write all the same).
HALF_CLOSE_GRACE_S = 2.0
log = logging.getLogger("planer.serve")


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, closing connections whose next request's headers are late (`deadline_s`)
    and keeping at most `max_connections` open. `waiting` holds one server's connections that wait for a
    request's headers, longest-waiting first (set per server by `guarded_protocol`)."""

    deadline_s: ClassVar[float]
    max_connections: ClassVar[int]
    waiting: ClassVar[dict[GuardedH11Protocol, None]]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections and not self._close_longest_waiting():
            transport.write(BUSY)
            transport.close()
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self.waiting.pop(self, None)
        super().connection_lost(exc)

    def eof_received(self) -> bool | None:
        """The client sends no more. uvicorn closes the connection then, so a client that shuts its sending side
        after a request (`nc -N`) never got the answer; the same end of input is all a client that hung up shows
        until something is written to it. So a request received in full keeps the connection open for its answer
        up to HALF_CLOSE_GRACE_S, then it closes (and the app sees a disconnect, which stops a generation);
        anything else, a request's headers or body cut short among it, closes it at once, as before."""
        cycle = self.cycle
        if cycle is None or cycle.response_complete or cycle.more_body:
            return None
        cycle.keep_alive = False  # no request can follow: close once the answer is out
        self.loop.call_later(HALF_CLOSE_GRACE_S, self._unanswered, cycle)
        return True

    def _unanswered(self, cycle: RequestResponseCycle) -> None:
        if not cycle.response_complete and not self.transport.is_closing():
            self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def _arm(self) -> None:
        self._before = self.cycle  # a request whose headers arrive in full replaces it
        self.waiting.pop(self, None)
        self.waiting[self] = None
        self.loop.call_later(self.deadline_s, self._expire, self._before)

    def _expire(self, before: object) -> None:
        if self.cycle is before and not self.transport.is_closing():
            self.transport.close()

    def _close_longest_waiting(self) -> bool:
        """Closes the connection that has waited longest for a request's headers; False when none waits.
        Connections that began a request since they were listed are dropped from the list on the way."""
        while self.waiting:
            oldest = next(iter(self.waiting))
            del self.waiting[oldest]
            if oldest.cycle is oldest._before and not oldest.transport.is_closing():
                oldest.transport.close()
                return True
        return False


def guarded_protocol(deadline_s: float, max_connections: int) -> type[GuardedH11Protocol]:
    """The protocol class of one server (the list of waiting connections is the server's own)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,),
                {"deadline_s": deadline_s, "max_connections": max_connections, "waiting": {}})


def connection_cap() -> int:
    """How many connections may be open at once: the soft file limit less the descriptors open now (the
    engine's and the process's own, once the model is loaded) and a spare share of the limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return sys.maxsize
    return max(1, soft - _open_descriptors() - max(MIN_SPARE_DESCRIPTORS, int(soft * SPARE_SHARE)))


def _open_descriptors() -> int:
    for listing in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(listing)) - 1  # less the one listing it
        except OSError:
            continue
    return 0


class AcceptGuard:
    """An event loop's exception handler: when accept() finds no descriptor left, it accepts and closes the
    connections waiting, on a descriptor it keeps spare, and logs one line per `interval_s`; anything else goes
    to the loop's default handler."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self.spare = _spare()
        self.dropped = 0
        self.logged_at = -math.inf

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc, listener = context.get("exception"), context.get("socket")
        if not (isinstance(exc, OSError) and exc.errno in OUT_OF_DESCRIPTORS and listener is not None):
            loop.default_exception_handler(context)
            return
        self.dropped += self._drain(listener.fileno())
        # Only once asyncio's accept loop has ended: at the limit accept() fails even with nothing waiting, and
        # the free descriptor lets it find the backlog empty.
        loop.call_soon(self._keep_spare)
        now = time.monotonic()
        if now - self.logged_at >= self.interval_s:
            limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            log.warning("out of file descriptors (%s, limit %s): %d connections closed unanswered since the last "
                        "such warning; raise the limit (ulimit -n) or find what holds the descriptors",
                        exc.strerror, limit, self.dropped)
            self.logged_at, self.dropped = now, 0

    def _drain(self, fd: int) -> int:
        """Accepts and closes the connections waiting on the listening socket `fd`, on the spare descriptor
        (freed, and left free); their count."""
        if self.spare is not None:
            os.close(self.spare)
            self.spare = None
        listener = socket.socket(fileno=fd)  # the same descriptor, not a copy: a copy would need one more
        closed = 0
        try:
            while True:
                listener.accept()[0].close()
                closed += 1
        except OSError:  # none waits any more (BlockingIOError), or the spare was taken meanwhile
            pass
        finally:
            listener.detach()
        return closed

    def _keep_spare(self) -> None:
        if self.spare is None:
            self.spare = _spare()


def _spare() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:  # taken by a connection meanwhile: the next drain does without
        return None


class GuardedEventLoop(asyncio.SelectorEventLoop):
    """asyncio's event loop, accepting at most ACCEPT_BATCH connections per wake-up of a listening socket."""

    def _accept_connection(self, protocol_factory: Any, sock: Any, sslcontext: Any = None, server: Any = None,
                           backlog: int = 100, *args: Any) -> None:
        # asyncio accepts up to the listen backlog (2,048) in one go, each connection holding a descriptor until
        # a later turn of the loop, when the protocol can close the surplus: a burst ran out of descriptors.
        super()._accept_connection(protocol_factory, sock, sslcontext, server, min(backlog, ACCEPT_BATCH), *args)


class GuardedServer(uvicorn.Server):
    """uvicorn's server with AcceptGuard on its event loop."""

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        asyncio.get_running_loop().set_exception_handler(AcceptGuard())
        await super().serve(sockets)
