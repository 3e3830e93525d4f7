"""What the serving CLI modules share: the run-locating options and the command-group lookup.

``cli.py`` registers the serving commands while it is still being imported, so its own option
aliases and helpers are not importable from there yet; they are defined here, and the helpers
(``_config``, ``_run_dir``) are imported inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Config = Annotated[list[Path] | None, typer.Option(
    "--config", "-c", help="YAML file(s) layered over the profile, in order.")]
Profile = Annotated[str, typer.Option("--profile", "-p", help="named profile")]
Sets = Annotated[list[str] | None, typer.Option("--set", help="override, e.g. seed=1")]
Out = Annotated[Path | None, typer.Option(
    "--out", "-o", help="run directory (default runs/<profile>)")]
Json = Annotated[bool, typer.Option("--json", help="print JSON")]


def command_group(app: typer.Typer, name: str) -> typer.Typer:
    """The ``sigma <name>`` sub-app (e.g. ``bench``) that the serving commands join."""
    for g in app.registered_groups:
        if g.name == name and g.typer_instance is not None:
            return g.typer_instance
    raise RuntimeError(f"the `sigma {name}` command group must be added before serving registers")
