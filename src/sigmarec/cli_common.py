"""What every ``sigma`` command shares: the console, logging set-up, config loading, the run
directory, the run-locating options and the command-group lookup.

It imports no command module, so ``cli.py`` and the serving commands (``serving/cli_*.py``) both
import it and neither imports the other's helpers.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler

from sigmarec.config import SigmaConfig, available_profiles, load_config

# Piped output (CI logs, `| tee`) gets a width that fits the results tables.
console = Console(width=None if sys.stdout.isatty() else 150)

ConfigOpt = Annotated[
    list[Path] | None,
    typer.Option("--config", "-c", help="YAML file(s) layered over the profile, in order."),
]
ProfileOpt = Annotated[
    str, typer.Option("--profile", "-p", help=f"named profile: {', '.join(available_profiles())}")
]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override, e.g. seed=1")]
OutOpt = Annotated[
    Path | None, typer.Option("--out", "-o", help="run directory (default runs/<profile>)")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]


def setup_logging(verbose: bool) -> None:
    """Log records to stderr through rich (DEBUG with ``verbose``)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=Console(stderr=True), show_path=False)],
        force=True,
    )
    # accelerate logs every checkpoint file at INFO; keep the run log readable
    logging.getLogger("accelerate").setLevel(logging.DEBUG if verbose else logging.WARNING)


def command_config(profile: str, config: list[Path] | None, sets: list[str] | None
                   ) -> SigmaConfig:
    """The config of a command's ``--profile``, ``--config`` files and ``--set`` overrides."""
    return load_config(profile, files=config, overrides=sets)


def run_dir_of(out: Path | None, cfg: SigmaConfig) -> Path:
    """The run directory of ``--out`` (default ``runs/<profile>``)."""
    return out if out is not None else Path("runs") / cfg.profile


def command_group(app: typer.Typer, name: str) -> typer.Typer:
    """The ``sigma <name>`` sub-app (e.g. ``bench``) that the serving commands join."""
    for g in app.registered_groups:
        if g.name == name and g.typer_instance is not None:
            return g.typer_instance
    raise RuntimeError(f"the `sigma {name}` command group must be added before serving registers")
