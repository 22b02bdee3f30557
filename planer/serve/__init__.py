"""`planer serve`: an HTTP server on a built model's engine (torch-free, like planer.runtime).

See `planer.serve.app` for the API, `planer.serve.batcher` for how requests
share engine calls.
"""

from __future__ import annotations

from pathlib import Path

from planer.serve.app import ServeConfig, create_app


def serve(build_dir: str | Path, *, engine: str = "ort", threads: int | None = None, host: str = "127.0.0.1",
          port: int = 8000, config: ServeConfig = ServeConfig(), log_level: str = "info") -> None:
    """Serve until interrupted."""
    import uvicorn

    uvicorn.run(create_app(build_dir, engine=engine, threads=threads, config=config), host=host, port=port,
                log_level=log_level)


__all__ = ["ServeConfig", "create_app", "serve"]
