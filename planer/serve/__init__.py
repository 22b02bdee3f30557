"""`planer serve`: an HTTP server on a built model's engine (torch-free, like planer.runtime).

See `planer.serve.app` for the API, `planer.serve.batcher` for how requests
share engine calls.
"""

from __future__ import annotations

import resource
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from planer.serve.app import LOOPBACK, ServeConfig, create_app

if TYPE_CHECKING:
    import uvicorn
    from starlette.applications import Starlette


def allowed_hosts(bind: str, extra: Sequence[str] = ()) -> list[str] | None:
    """The host names a server bound to `bind` answers: on a loopback address the loopback names (and `extra`),
    so that no web page can drive it; elsewhere `extra` and the address itself when names are given, any
    otherwise (None)."""
    if bind in LOOPBACK or bind.startswith("127."):
        return [*LOOPBACK, bind, *extra]
    return [bind, *extra] if extra else None


def serve(build_dir: str | Path, *, engine: str = "ort", threads: int | None = None, host: str = "127.0.0.1",
          port: int = 8000, config: ServeConfig = ServeConfig(), log_level: str = "info",
          model_name: str | None = None, allow_hosts: Sequence[str] = ()) -> None:
    """Serve until interrupted."""
    from planer.serve.connections import GuardedServer

    app = create_app(build_dir, engine=engine, threads=threads, config=config, model_name=model_name,
                     allowed_hosts=allowed_hosts(host, allow_hosts))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # every connection holds a file descriptor
    wanted = 65536 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    GuardedServer(server_config(app, config, host=host, port=port, log_level=log_level)).run()


def server_config(app: Starlette, config: ServeConfig, **options: object) -> uvicorn.Config:
    """uvicorn's configuration of `app`, with `options` (host, port, log_level, ...): connections that do not
    finish a request's headers within config.body_timeout_s are closed, and as many may be open at once as the
    file limit leaves room for (planer.serve.connections; call it once the model is loaded). The event loop is
    asyncio's (GuardedEventLoop), the one GuardedServer guards, even where uvloop is installed."""
    import uvicorn

    from planer.serve.connections import connection_cap, guarded_protocol

    return uvicorn.Config(app, http=guarded_protocol(config.body_timeout_s, connection_cap()),
                          loop="planer.serve.connections:GuardedEventLoop", **options)


__all__ = ["ServeConfig", "allowed_hosts", "create_app", "serve", "server_config"]
