"""How a run's prompts read: the system prompt and whether the profile line is shown.

The tasks stage decides it once, from the config (``tasks.system_prompt``) and the data (a
dataset none of whose users has an attribute gets no profile line: "unknown" on every prompt
says nothing and costs prompt tokens), and writes it beside its samples as ``prompt.json``.
Training, the GR baselines, generation, the benches and serving read it from there, so every
prompt of a run (trained, evaluated or served) reads the same, whatever config the reader was
started with. A run whose tasks stage predates the file was made with :data:`DEFAULT_STYLE`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sigmarec.core.atomic import write_json
from sigmarec.errors import StageError
from sigmarec.tasks.config import TasksConfig
from sigmarec.tasks.text import UNKNOWN_PROFILE

SYSTEM_PROMPT = ("You are a recommender for a grocery retailer. Read the household's profile, "
                 "what it bought recently and the request, then name the product to show.")
PROMPT_FILE = "prompt.json"


class PromptStyle(BaseModel):
    """The parts of a prompt that are the same for every sample of a run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    system: str = Field(SYSTEM_PROMPT, min_length=1, description="the system turn")
    profile_line: bool = Field(True, description="the user turn opens with the profile line")


DEFAULT_STYLE = PromptStyle()


def prompt_style(cfg: TasksConfig, profiles: Sequence[str]) -> PromptStyle:
    """The style of a run: ``cfg``'s system prompt (None = the grocery one), and the profile line
    unless every user's profile (``TaskResources.profiles``) is the unknown one."""
    return PromptStyle(system=cfg.system_prompt if cfg.system_prompt is not None
                       else SYSTEM_PROMPT,
                       profile_line=any(p != UNKNOWN_PROFILE for p in profiles))


def save_prompt_style(tasks_dir: Path, style: PromptStyle) -> None:
    write_json(Path(tasks_dir) / PROMPT_FILE, style.model_dump())


def load_prompt_style(tasks_dir: Path) -> PromptStyle:
    """The style a run's tasks stage chose; :data:`DEFAULT_STYLE` for a tasks stage that ran
    before the choice was written (its prompts were all rendered with it)."""
    path = Path(tasks_dir) / PROMPT_FILE
    if not path.is_file():
        if Path(tasks_dir).is_dir():
            return DEFAULT_STYLE
        raise StageError(f"{tasks_dir}: no tasks stage output; run `sigma run` up to the tasks "
                         "stage first")
    try:
        return PromptStyle.model_validate_json(path.read_text())
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(file)"
        raise StageError(f"{path}: {where}: {err['msg']}") from None
