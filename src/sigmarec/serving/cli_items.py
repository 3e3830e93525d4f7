"""CLI commands of serving (items), registered on the `sigma` app by :func:`register`:
``sigma items add`` (new items without retraining) and ``sigma bench coldstart``."""

from __future__ import annotations

import json
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
    command_group,
    console,
    run_dir_of,
    setup_logging,
)


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app`` (heavy imports stay inside the commands)."""
    items_app = typer.Typer(no_args_is_help=True,
                            help="Items added after training (recommendable without retraining).")
    app.add_typer(items_app, name="items")

    @items_app.command("add")
    def add(
        items_file: Annotated[Path, typer.Argument(
            help="new items: CSV/TSV/Parquet/JSONL, in the data layer's item schema or mapped "
            "by data.files.item_columns")],
        config: ConfigOpt = None,
        profile: ProfileOpt = "default",
        out: OutOpt = None,
        sets: SetOpt = None,
        as_json: JsonOpt = False,
        verbose: bool = False,
    ) -> None:
        """Onboard new items into a trained run: text embedding, semantic ID, soft token;
        published atomically as a new catalogue version."""
        from sigmarec.serving.items import add_items
        from sigmarec.tokenization.artifacts import load_vocab

        setup_logging(verbose)
        cfg = command_config(profile, config, sets)
        run_dir = run_dir_of(out, cfg)
        before = _count_added(run_dir)
        overlay = add_items(run_dir, cfg, items_file)
        vocab, _ = load_vocab(run_dir / "tokenization")
        new = overlay.items.iloc[before:] if before <= overlay.n_items else overlay.items
        # The prefix as tokens (<a_11>), as prompts, serving and the docs show it; the flat id
        # stays in the JSON for scripts.
        rows = [{"item_idx": int(r.item_idx), "item_id": str(r.item_id), "text": str(r.text),
                 "semantic_id": [int(c) for c in overlay.codes[i]],
                 "prefix": vocab.prefix_text(int(overlay.prefix[i])),
                 "prefix_id": int(overlay.prefix[i])}
                for i, r in zip(range(overlay.n_items - len(new), overlay.n_items),
                                new.itertuples(index=False), strict=True)]
        if as_json:
            print(json.dumps({"version": overlay.version, "added": rows,
                              "catalogue_added_items": overlay.n_items}, indent=2))
            return
        from rich.table import Table

        t = Table(title=f"added to {run_dir} as catalogue {overlay.version}")
        for col in ("item_idx", "item_id", "text", "semantic ID", "prefix"):
            t.add_column(col)
        for r in rows[:50]:
            t.add_row(str(r["item_idx"]), r["item_id"], r["text"][:60],
                      " ".join(map(str, r["semantic_id"])), r["prefix"])
        console.print(t)
        if len(rows) > 50:
            console.print(f"... and {len(rows) - 50} more")
        console.print(f"{len(rows)} items added; {overlay.n_items} added items in all; the "
                      "service picks them up on its next reload")

    bench = command_group(app, "bench")

    @bench.command("coldstart")
    def coldstart(
        config: ConfigOpt = None,
        profile: ProfileOpt = "default",
        out: OutOpt = None,
        sets: SetOpt = None,
        batch_size: Annotated[int, typer.Option(help="SIGMA prompts per decoder call")] = 16,
        max_instances: Annotated[int | None, typer.Option(
            help="at most this many instances of each set (seeded sample)")] = None,
        verbose: bool = False,
    ) -> None:
        """Cold-start evaluation: onboard the held-out new items (data.holdout_new_items_weeks)
        with `items add`, then measure how SIGMA and the baselines recommend them."""
        from sigmarec.core.atomic import write_json
        from sigmarec.serving.coldstart import coldstart_table, run_coldstart

        setup_logging(verbose)
        cfg = command_config(profile, config, sets)
        run_dir = run_dir_of(out, cfg)
        result = run_coldstart(run_dir, cfg, batch_size=batch_size, max_instances=max_instances)
        write_json(run_dir / "serving" / "coldstart.json", result)
        console.print(coldstart_table(result))
        console.print(f"written to {run_dir / 'serving' / 'coldstart.json'}")


def _count_added(run_dir: Path) -> int:
    from sigmarec.errors import SigmaError
    from sigmarec.serving.catalog import load_overlay

    try:
        prev = load_overlay(run_dir, check=False)
    except SigmaError:  # a broken previous version is reported by add_items
        return 0
    return 0 if prev is None else prev.n_items
