"""What every copy-prior channel says about itself (see :mod:`sigmarec.tasks.channels`).

A channel is a table of (item, value) lists, one per prompt, that the copy prior reads as two
gates (one on the prefix logits, one on the item scores). The class says where the lists come
from, how the tasks stage and the serving runtime list them for one prompt, how a row of the
prompt tables carries them, how the collator checks them and how the model scales them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

import numpy as np

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from sigmarec.tasks.config import TasksConfig
    from sigmarec.tasks.resources import TaskResources

# history: listed from the household's whole history before the cut (a prompt-table column);
# instruction: listed from the instruction's words when the examples are built;
# item: derived by the model from another channel's items and a per-item value.
Source = Literal["history", "instruction", "item"]
Lists = tuple[tuple[int, ...], tuple[float, ...]]
Lister = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


class Matcher(Protocol):
    """What the instruction channels read of :class:`sigmarec.tasks.text_match.
    InstructionMatcher` (named by shape: the matcher's module reads the prompt templates, which
    read the channels)."""

    n_items: int

    def match(self, instructions: Sequence[str], prefer: Sequence[Sequence[int]] | None = None
              ) -> list[tuple[np.ndarray, np.ndarray]]: ...


@dataclass
class ExampleContext:
    """What a channel may read while the examples of a prompt table are built: the model's
    config, the instruction matcher (None without one) and the lists of the channels before
    it, by name."""

    model_cfg: Any
    matcher: Matcher | None
    lists: dict[str, list[Lists]]


class Channel:
    """One copy-prior channel. Subclasses set the class attributes and override the hooks of
    their source; the registry's order (:data:`sigmarec.tasks.channels.CHANNELS`) is the gate
    order, so a new channel goes at the end."""

    name: ClassVar[str]  # registry name; the ablation is no_<name>
    key: ClassVar[str]  # prompt columns and batch fields <key>_items / <key>_values
    source: ClassVar[Source]
    flag: ClassVar[str]  # the ModelConfig switch
    merged: ClassVar[bool] = True  # the decoder merges the listed items into its candidates
    scale: ClassVar[str | None] = None  # ModelConfig field the model multiplies the values by
    # ModelConfig fields the no_<name> ablation sets besides ``flag: false`` (the refinements
    # and channels that need this one).
    ablation_extra: ClassVar[Mapping[str, Any]] = {}
    integer_values: ClassVar[bool] = False  # values are counts (kept as ints in the examples)
    what: ClassVar[str] = "in (0, 1]"  # the values the collator accepts, for its error
    strict_rows: ClassVar[bool] = False  # an active model refuses prompt rows without columns
    state_keys: ClassVar[tuple[str, ...]] = ()  # model buffers saved with the trained weights
    missing_fix: ClassVar[str] = ""  # how to give a batch the lists, for the model's error

    # ------------------------------------------------------------------ what it is

    def active(self, model_cfg: Any) -> bool:
        """Whether a model with ``model_cfg`` reads this channel."""
        return bool(getattr(model_cfg, self.flag))

    @property
    def collated(self) -> bool:
        """Whether examples and batches carry the channel's own lists (not derived)."""
        return self.source != "item"

    @property
    def columns(self) -> tuple[str, str]:
        return f"{self.key}_items", f"{self.key}_values"

    @property
    def ablation(self) -> dict[str, Any]:
        """The ``model`` overlay of the no_<name> ablation."""
        return {self.flag: False, **self.ablation_extra}

    def valid(self, value: float) -> bool:
        return 0 < value <= 1 + 1e-6

    # ------------------------------------------------------------------ listing

    def lister(self, res: TaskResources, cfg: TasksConfig) -> Lister | None:
        """history channels: the function that lists (items, values) for one household's whole
        history before the cut (None: rows carry empty lists)."""
        raise NotImplementedError(f"channel {self.name!r} is not listed from the history")

    def empty(self) -> tuple[np.ndarray, np.ndarray]:
        return (np.zeros(0, dtype=np.int64),
                np.zeros(0, dtype=np.int64 if self.integer_values else np.float64))

    def example_lists(self, rows: pd.DataFrame, ctx: ExampleContext) -> list[Lists]:
        """The lists of every row of a prompt table, as the examples carry them. history
        channels read their columns (rows written before a column existed carry none, which
        ``strict_rows`` refuses for a model that reads the channel)."""
        items_col, values_col = self.columns
        required = self.strict_rows and self.active(ctx.model_cfg)
        cast = int if self.integer_values else float
        vtype = np.int64 if self.integer_values else np.float64
        out: list[Lists] = []
        for row in rows.itertuples(index=False):
            items, values = getattr(row, items_col, None), getattr(row, values_col, None)
            if (items is None or values is None
                    or (isinstance(items, float) and np.isnan(items))):
                if required:
                    raise ValueError(
                        f"this model reads the {self.name} channel (model.{self.flag}) but the "
                        f"prompt rows have no {items_col} / {values_col} columns: rerun the "
                        "tasks stage (sigma run --force tasks)")
                out.append(((), ()))
                continue
            out.append((tuple(int(i) for i in np.asarray(items, dtype=np.int64)),
                        tuple(cast(v) for v in np.asarray(values, dtype=vtype))))
        return out

    # ------------------------------------------------------------------ the model's side

    def slot_lists(self, lists: Mapping[str, tuple[torch.Tensor, torch.Tensor]], model: Any
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(items, values) (R, W) as the copy prior reads them, from a prompt batch's lists
        (by channel name); a model that reads the channel cannot score without them."""
        got = lists.get(self.name)
        if got is None or got[0] is None or got[1] is None:
            items_col, values_col = self.columns
            raise ValueError(f"this model scores with the {self.name} channel (model.{self.flag})"
                             f" but the batch has no {items_col} / {values_col}: "
                             f"{self.missing_fix}")
        items, values = got
        if self.scale is not None:
            values = values * getattr(model.cfg, self.scale)
        return items, values

    def prepare(self, model: Any, train_counts: np.ndarray) -> None:
        """Set the model's per-item state the channel reads (from the items' training
        purchase counts) before training; nothing for most channels."""
