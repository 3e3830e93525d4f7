"""What a recommendation request is, before and after the runtime checks it, and its answer.

:class:`RecRequest` (a known user or an explicit history, a task or a free-text instruction,
``k``, filters, the model) comes from the HTTP API, the CLI or the nearline job;
:class:`~sigmarec.serving.runtime.Runtime` turns it into a :class:`Resolved` request and answers
with :class:`RecItem` lists. Every mistake is a :class:`RequestError` naming the field at fault.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from sigmarec.errors import SigmaError

SIGMA = "sigma"


class RequestError(SigmaError):
    """A bad request; ``field`` names the request field at fault (``history[2]``, ``k``...)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class RecRequest(BaseModel):
    """One recommendation request: a known user or an explicit history (+ profile), a task or a
    free-text instruction, ``k``, filters and the model to answer with."""

    model_config = ConfigDict(extra="forbid")

    user_id: str | None = None
    history: list[str] | None = None  # raw item ids, oldest first
    profile: dict[str, str] | None = None  # profile column -> value (users.parquet columns)
    task: str | None = None
    instruction: str | None = None
    k: int = 10
    category: str | None = None  # a category name at any level or a path prefix "A > B"
    exclude_bought: bool = False
    allow_items: list[str] | None = None  # raw item ids
    model: str = SIGMA


class RecItem(BaseModel):
    rank: int
    item_id: str
    text: str
    prefix: str
    score: float


@dataclass(frozen=True)
class Resolved:
    """A checked request in the model's terms."""

    user_idx: int  # -1 for an explicit history
    history: np.ndarray  # full history, item indices, oldest first
    profile: str  # the profile line of the prompt
    task: str
    params: dict[str, Any]
    instruction: str  # the request line of the prompt
    k: int
    model: str
    allow: np.ndarray | None  # (n_items,) bool, None = no filter


def request_from_json(payload: str | bytes, **overrides: Any) -> RecRequest:
    """A :class:`RecRequest` from a JSON document (``history``/``profile``...), with CLI-style
    overrides; malformed JSON or fields are a :class:`RequestError`."""
    from pydantic import ValidationError

    try:
        body = json.loads(payload)
    except json.JSONDecodeError as e:
        raise RequestError("body", f"malformed JSON: {e}") from None
    if not isinstance(body, dict):
        raise RequestError("body", "expected a JSON object")
    body.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return RecRequest(**body)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err["loc"]) or "body"
        raise RequestError(field, err["msg"]) from None
