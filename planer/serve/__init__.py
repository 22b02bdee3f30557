"""`planer serve`: an HTTP server on a built model's engine (torch-free, like planer.runtime).

See `planer.serve.app` for the API, `planer.serve.batcher` for how requests
share engine calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from planer.serve.app import LOOPBACK, ServeConfig, create_app


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
    import uvicorn

    app = create_app(build_dir, engine=engine, threads=threads, config=config, model_name=model_name,
                     allowed_hosts=allowed_hosts(host, allow_hosts))
    uvicorn.run(app, host=host, port=port, log_level=log_level)


__all__ = ["ServeConfig", "allowed_hosts", "create_app", "serve"]
