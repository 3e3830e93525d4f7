"""CLI commands of serving (recommend), registered on the `sigma` app by :func:`register`:
``sigma recommend`` (one request from the command line) and ``sigma serve`` (the HTTP service)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from sigmarec.cli_common import (
    ConfigOpt,
    JsonOpt,
    OutOpt,
    ProfileOpt,
    SetOpt,
    command_config,
    run_dir_of,
    setup_logging,
)


def _read_allow(path: Path) -> list[str]:
    """Item ids, one per line (blank lines and '#' comments skipped), or a JSON list."""
    from sigmarec.serving.request import RequestError

    try:
        text = path.read_text()
    except OSError as e:
        raise RequestError("allow", f"cannot read {path}: {e.strerror}") from None
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise RequestError("allow", f"{path}: malformed JSON: {e}") from None
        if not isinstance(items, list):
            raise RequestError("allow", f"{path}: expected a JSON list of item ids")
        return [str(i) for i in items]
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app`` (heavy imports stay inside the commands)."""

    @app.command()
    def recommend(
        user: Annotated[str | None, typer.Option("--user", help="a known user id")] = None,
        history_json: Annotated[str | None, typer.Option(
            "--history-json", help='FILE or - (stdin): {"history": [item ids, oldest first], '
            '"profile": {...}}')] = None,
        task: Annotated[str | None, typer.Option(help="a task name, e.g. JustForYou")] = None,
        instruction: Annotated[str | None, typer.Option(
            help="free text, mapped onto a task")] = None,
        k: Annotated[int, typer.Option("-k", help="items to return")] = 10,
        category: Annotated[str | None, typer.Option(
            help="only items under this category (a name at any level or 'A > B')")] = None,
        exclude_bought: Annotated[bool, typer.Option(
            "--exclude-bought", help="never return an item of the history")] = False,
        allow: Annotated[Path | None, typer.Option(
            help="only these items: a file of item ids (one per line, or a JSON list)")] = None,
        model: Annotated[str, typer.Option(help="sigma or a baseline of the run")] = "sigma",
        as_json: JsonOpt = False,
        config: ConfigOpt = None,
        profile: ProfileOpt = "default",
        out: OutOpt = None,
        sets: SetOpt = None,
    ) -> None:
        """Recommend items for one user (or an explicit history) from a finished run."""
        from rich.console import Console
        from rich.table import Table

        from sigmarec.core.seed import set_threads
        from sigmarec.serving.request import RecRequest, RequestError, request_from_json
        from sigmarec.serving.runtime import Runtime

        setup_logging(False)
        fields = {"task": task, "instruction": instruction, "k": k, "category": category,
                  "exclude_bought": exclude_bought, "model": model,
                  "allow_items": _read_allow(allow) if allow is not None else None}
        if history_json is not None:
            if user is not None:
                raise RequestError("--history-json", "give --user or --history-json, not both")
            try:
                payload = sys.stdin.read() if history_json == "-" else Path(
                    history_json).read_text()
            except OSError as e:
                raise RequestError("--history-json", f"cannot read {history_json}: "
                                   f"{e.strerror}") from None
            req = request_from_json(payload, **fields)
        elif user is not None:
            req = RecRequest(user_id=user, **fields)
        else:
            raise RequestError("--user", "give --user ID or --history-json FILE|-")
        cfg = command_config(profile, config, sets)
        set_threads(cfg.threads)
        rt = Runtime.load(run_dir_of(out, cfg), cfg)
        resolved = rt.resolve(req)
        items = rt.rank([resolved])[0]
        if as_json:
            typer.echo(json.dumps({"model": req.model, "task": resolved.task,
                                   "params": resolved.params,
                                   "instruction": resolved.instruction,
                                   "items": [i.model_dump() for i in items]}, indent=2))
            return
        t = Table(title=f"{req.model} · {resolved.task} · {resolved.instruction}")
        for col, just in (("rank", "right"), ("item id", "left"), ("item text", "left"),
                          ("prefix", "left"), ("score", "right")):
            t.add_column(col, justify=just)
        for i in items:
            t.add_row(str(i.rank), i.item_id, i.text, i.prefix, f"{i.score:.4f}")
        Console(width=None if sys.stdout.isatty() else 150).print(t)

    @app.command()
    def serve(
        host: Annotated[str | None, typer.Option(
            help="bind address (default serving.service.host)")] = None,
        port: Annotated[int | None, typer.Option(
            help="port (default serving.service.port; 0 = any free port)")] = None,
        config: ConfigOpt = None,
        profile: ProfileOpt = "default",
        out: OutOpt = None,
        sets: SetOpt = None,
        verbose: bool = False,
    ) -> None:
        """Serve a finished run over HTTP (FastAPI + uvicorn); see docs/serving.md. Exits
        non-zero, with the reason, when the run cannot be loaded."""
        import uvicorn

        from sigmarec.core.seed import set_threads
        from sigmarec.errors import SigmaError
        from sigmarec.serving.api import create_app

        setup_logging(verbose)
        cfg = command_config(profile, config, sets)
        set_threads(cfg.threads)
        svc = cfg.serving.service
        run_dir = run_dir_of(out, cfg)
        server: uvicorn.Server | None = None

        def stop(reason: str) -> None:
            # /readyz answers 503 "failed" with the reason until the server has shut down; a
            # service that can never be ready must not wait for clients forever.
            if server is not None:
                server.should_exit = True

        app_ = create_app(run_dir, cfg, on_load_failure=stop)
        server = uvicorn.Server(uvicorn.Config(
            app_, host=host or svc.host, port=svc.port if port is None else port,
            log_level="debug" if verbose else "info", access_log=verbose,
            timeout_graceful_shutdown=10))
        server.run()
        error = app_.state.service.error
        if error is not None:
            raise SigmaError(f"sigma serve: cannot load {run_dir.resolve()}: {error}")
        if not server.started:  # e.g. the port is taken; uvicorn logged why
            raise SigmaError(f"sigma serve: the server did not start on "
                             f"{server.config.host}:{server.config.port} (see the log above)")
