"""A deadline on every request's headers.

uvicorn closes an idle keep-alive connection only after a response, and a connection that sends a byte now and
then cancels even that timer. So connections that open and never finish a request line and headers stay open for
good: about 1,100 of them exhausted a server's file descriptors (the default limit is 1,024), after which valid
requests timed out and the accept loop spun. With this protocol a connection that has not begun a request within
the deadline of opening, or of its last response, is closed.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol


class HeaderDeadline(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, closing connections whose next request's headers are late (`deadline_s`)."""

    deadline_s = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def _arm(self) -> None:
        waiting = self.cycle  # a request whose headers arrive in full replaces it

        def expire() -> None:
            if self.cycle is waiting and not self.transport.is_closing():
                self.transport.close()

        self.loop.call_later(self.deadline_s, expire)


def with_header_deadline(seconds: float) -> type[HeaderDeadline]:
    return type("HeaderDeadline", (HeaderDeadline,), {"deadline_s": seconds})
