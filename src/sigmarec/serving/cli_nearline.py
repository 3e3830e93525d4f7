"""CLI commands of serving (nearline), registered on the `sigma` app by :func:`register`:
``sigma nearline --events FILE``, ``sigma u2i get`` / ``sigma u2i versions`` (read the store) and
``sigma bench nearline`` (incremental update with KV reuse vs recomputing from scratch)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from sigmarec.cli_common import (
    ConfigOpt,
    JsonOpt,
    OutOpt,
    ProfileOpt,
    SetOpt,
    command_config,
    command_group,
    run_dir_of,
    setup_logging,
)


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app`` (heavy imports stay inside the commands)."""

    @app.command()
    def nearline(
        events: Annotated[Path, typer.Option(
            "--events", help="new interactions (CSV/TSV/Parquet/JSONL; columns as "
            "data.files.interaction_columns)")],
        config: ConfigOpt = None,
        profile: ProfileOpt = "default",
        out: OutOpt = None,
        sets: SetOpt = None,
        as_json: JsonOpt = False,
        verbose: bool = False,
    ) -> None:
        """Append new interactions, recompute the users they touch for serving.nearline.tasks
        and publish the lists as a new U2I store version (rerun after a crash to finish)."""
        from dataclasses import asdict

        from rich.console import Console

        from sigmarec.serving.nearline import run_nearline

        setup_logging(verbose)
        cfg = command_config(profile, config, sets)
        res = run_nearline(run_dir_of(out, cfg), cfg, events)
        if as_json:
            typer.echo(json.dumps(asdict(res), indent=2))
            return
        con = Console()
        if res.already_published:
            con.print(f"{events}: already published as U2I version {res.version} "
                      f"({res.rows} rows); nothing to do")
            return
        con.print(f"U2I version {res.version}: {res.rows} lists ({res.users} users x "
                  f"{', '.join(res.tasks)}) from {res.events_file}"
                  f"{'' if res.appended else ' (appended by an earlier, interrupted run)'}")
        if res.reuse:
            r = res.reuse
            con.print(f"prompt KV reuse: {r['reused_tokens']}/{r['tokens']} tokens "
                      f"({r['reused_share']:.0%}); reuse ended in {r['reuse_ends_in']}")
        con.print(f"seconds: {res.seconds}")

    u2i_app = typer.Typer(no_args_is_help=True, help="Read the user-to-item (U2I) store.")
    app.add_typer(u2i_app, name="u2i")

    @u2i_app.command("get")
    def u2i_get(
        user: Annotated[str, typer.Option("--user", help="a user id")],
        task: Annotated[str, typer.Option("--task", help="a task name")] = "JustForYou",
        version: Annotated[int | None, typer.Option(
            help="read as of this version (default: the newest)")] = None,
        config: ConfigOpt = None,
        profile: ProfileOpt = "default",
        out: OutOpt = None,
        sets: SetOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        """The published list of a user and task."""
        from dataclasses import asdict

        from rich.console import Console
        from rich.table import Table

        from sigmarec.errors import SigmaError

        with _u2i_store(profile, config, sets, out) as (cfg, run_dir, store):
            entry = store.get(user, task, version)
            latest = store.latest_version()
        if entry is None:
            where = "the store is empty" if latest is None else f"newest version {latest}"
            raise SigmaError(f"u2i: no list for user {user!r}, task {task!r} "
                             f"({cfg.serving.u2i_store}: {where})")
        if as_json:
            typer.echo(json.dumps(asdict(entry), indent=2))
            return
        texts = _item_texts(run_dir, entry.items)
        t = Table(title=f"user {user}, {task}: version {entry.version} ({entry.model}, "
                        f"published {entry.published_at})")
        for c in ("rank", "item id", "item", "score"):
            t.add_column(c, justify="right" if c in ("rank", "score") else "left")
        for r, (item, score) in enumerate(zip(entry.items, entry.scores, strict=True), 1):
            t.add_row(str(r), item, texts.get(item, ""), f"{score:.4f}")
        Console().print(t)

    @u2i_app.command("versions")
    def u2i_versions(
        config: ConfigOpt = None,
        profile: ProfileOpt = "default",
        out: OutOpt = None,
        sets: SetOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Every published version of the store, oldest first."""
        from dataclasses import asdict

        from rich.console import Console
        from rich.table import Table

        with _u2i_store(profile, config, sets, out) as (cfg, _, store):
            versions = store.versions()
        if as_json:
            typer.echo(json.dumps([asdict(v) for v in versions], indent=2))
            return
        t = Table(title=f"U2I store {cfg.serving.u2i_store}")
        for c in ("version", "published", "rows", "users", "tasks", "events file"):
            t.add_column(c)
        for v in versions:
            t.add_row(str(v.version), v.published_at, str(v.n_rows), str(v.meta.get("users", "")),
                      ", ".join(v.meta.get("tasks", [])), str(v.meta.get("events_file", "")))
        Console().print(t)

    bench = command_group(app, "bench")

    @bench.command("nearline")
    def bench_nearline_cmd(
        users: Annotated[int, typer.Option(help="users whose update is timed")] = 64,
        repeats: Annotated[int, typer.Option(help="timed repetitions of each method")] = 3,
        save: Annotated[Path | None, typer.Option(help="also write the figures as JSON")] = None,
        config: ConfigOpt = None,
        profile: ProfileOpt = "default",
        out: OutOpt = None,
        sets: SetOpt = None,
        verbose: bool = False,
    ) -> None:
        """Nearline update of the same users with prompt KV reuse vs from scratch, as ratios.
        Works on a temporary copy of the run directory (the run itself is never written)."""
        from rich.console import Console
        from rich.table import Table

        from sigmarec.errors import SigmaError
        from sigmarec.serving.nearline_bench import bench_nearline

        if users < 1 or repeats < 1:
            raise SigmaError(f"--users ({users}) and --repeats ({repeats}) must be >= 1")
        setup_logging(verbose)
        cfg = command_config(profile, config, sets)
        res = bench_nearline(run_dir_of(out, cfg), cfg, users, repeats)
        t = Table(title=f"bench nearline ({res['run']}, {users} users x {res['tasks']}, "
                        f"batch {res['batch_size']}, {res['threads']} threads)")
        for c in ("method", "tokens run", "prompt forward s", "speed-up", "update s",
                  "speed-up "):
            t.add_column(c, justify="right")
        for name, row in res["methods"].items():
            t.add_row(name, str(row["tokens_run"]), f"{row['prompt_s']:.3f}",
                      f"{row['speedup_prompt']:.2f}x", f"{row['update_s']:.3f}",
                      f"{row['speedup_update']:.2f}x")
        con = Console()
        con.print(t)
        con.print(f"reuse: {res['reuse']}")
        con.print(f"max |Δ prefix log-prob| {res['max_logprob_diff']:.2e}; same top-"
                  f"{res['k']} lists: {res['same_lists']:.0%}")
        if save is not None:
            from sigmarec.core.atomic import write_json

            write_json(save, res)
            con.print(f"written: {save}")


@contextmanager
def _u2i_store(profile: str, config: list[Path] | None, sets: list[str] | None,
               out: Path | None) -> Iterator[tuple[Any, Path, Any]]:
    """(config, run directory, open U2I store) of the u2i commands' shared options."""
    from sigmarec.serving.store import open_store

    cfg = command_config(profile, config, sets)
    run_dir = run_dir_of(out, cfg)
    with open_store(cfg.serving.u2i_store, run_dir) as store:
        yield cfg, run_dir, store


def _item_texts(run_dir: Path, ids: list[str]) -> dict[str, str]:
    """Readable names of the listed items (trained catalogue and added items)."""
    import pandas as pd

    from sigmarec.serving.catalog import load_overlay
    from sigmarec.tasks.sft_data import item_description

    path = Path(run_dir) / "data" / "items.parquet"
    if not path.is_file():
        return {}
    items = pd.read_parquet(path)
    overlay = load_overlay(run_dir)
    if overlay is not None:
        items = pd.concat([items, overlay.items], ignore_index=True)
    pos = {str(v): i for i, v in enumerate(items["item_id"])}
    return {i: item_description(items, pos[i]) for i in ids if i in pos}
