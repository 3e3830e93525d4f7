"""Typed settings of the tasks stage (multi-task instruction data for SFT and evaluation).

Kept here rather than in ``sigmarec.config`` so the task builder can be developed and tested on
its own; the root config embeds :class:`TasksConfig` as the section ``tasks``.
"""

from __future__ import annotations

from datetime import date
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

TaskName = Literal[
    "JustForYou", "Query", "Category", "Longtail", "Discover", "Season", "Holiday"
]
TASK_NAMES: tuple[str, ...] = (
    "JustForYou", "Query", "Category", "Longtail", "Discover", "Season", "Holiday"
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class HolidayWindow(_Strict):
    """A named holiday and the shopping window (inclusive dates) whose purchases it explains."""

    name: str = Field(description="key used in params, e.g. 'thanksgiving'")
    display: str = Field(description="how instructions name it, e.g. 'Thanksgiving'")
    start: date
    end: date
    aliases: list[str] = Field(default_factory=list, description="extra words free text may use")

    @model_validator(mode="after")
    def _ordered(self) -> HolidayWindow:
        if self.start > self.end:
            raise ValueError(f"holiday {self.name!r}: start {self.start} is after end {self.end}")
        return self


def _w(name: str, display: str, day: date, aliases: list[str]) -> HolidayWindow:
    # The 7 days ending with the holiday itself (shopping for it, and last-minute purchases).
    return HolidayWindow(name=name, display=display, start=date.fromordinal(day.toordinal() - 6),
                         end=day, aliases=aliases)


def default_holidays() -> list[HolidayWindow]:
    """US holidays of Complete Journey's year (2017) plus New Year 2018; windows do not overlap."""
    return [
        _w("super_bowl", "the Super Bowl", date(2017, 2, 5), ["super bowl", "superbowl",
                                                                "game day"]),
        _w("valentines", "Valentine's Day", date(2017, 2, 14), ["valentine", "valentines"]),
        _w("easter", "Easter", date(2017, 4, 16), ["easter"]),
        _w("memorial_day", "Memorial Day", date(2017, 5, 29), ["memorial day"]),
        _w("july_4th", "the Fourth of July", date(2017, 7, 4),
           ["fourth of july", "4th of july", "july 4", "july 4th", "independence day"]),
        _w("labor_day", "Labor Day", date(2017, 9, 4), ["labor day", "labour day"]),
        _w("halloween", "Halloween", date(2017, 10, 31), ["halloween"]),
        _w("thanksgiving", "Thanksgiving", date(2017, 11, 23), ["thanksgiving"]),
        _w("christmas", "Christmas", date(2017, 12, 25), ["christmas", "xmas", "x-mas"]),
        _w("new_year", "New Year's", date(2018, 1, 1),
           ["new year", "new years", "new year's", "new year's eve", "nye"]),
    ]


class SplitCaps(_Strict):
    """Caps of one task's evaluation instances: a number, "all", or None (the global cap)."""

    valid: int | Literal["all"] | None = Field(
        None, description="validation cap; \"all\" = no cap; null = valid_instances_per_task")
    test: int | Literal["all"] | None = Field(
        None, description="test cap; \"all\" = no cap; null = eval_instances_per_task")

    @field_validator("valid", "test")
    @classmethod
    def _positive(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, int) and v < 1:
            raise ValueError(f"a task cap must be >= 1 or \"all\", got {v}")
        return v


def default_seasons() -> dict[str, list[int]]:
    return {"winter": [12, 1, 2], "spring": [3, 4, 5], "summer": [6, 7, 8], "fall": [9, 10, 11]}


def default_weights() -> dict[str, float]:
    return {"JustForYou": 2.0, "Query": 1.0, "Category": 1.0, "Longtail": 1.0, "Discover": 1.0,
            "Season": 1.0, "Holiday": 1.0}


class TasksConfig(_Strict):
    enabled: list[TaskName] = Field(default_factory=lambda: list(TASK_NAMES))
    # Left out of the config dump (and so of the stage hash) while None, so runs made before
    # this option existed stay fresh.
    system_prompt: str | None = Field(
        None, min_length=1, exclude_if=lambda v: v is None,
        description="the system turn of every prompt (training, evaluation, serving); None = "
        "the grocery one (sigmarec.tasks.prompt_style.SYSTEM_PROMPT)"
    )
    history_len: int = Field(20, ge=1, description="most recent history items shown in a prompt")
    # Grocery is dominated by repurchase (the own-frequency baseline beats every learned model),
    # but a median household has bought ~340 items and a prompt shows the last few dozen: this
    # compact section carries the long-run repeat behaviour the recent window cannot.
    frequent_items: int = Field(
        0, ge=0, description="'Bought most often' section: the household's N most bought items "
        "before the cut (by count, ties to the most recent), as hybrid tokens; 0 = no section"
    )
    frequent_min_count: int = Field(
        2, ge=1, description="an item needs at least this many purchases to enter the section"
    )
    count_items: int = Field(
        200, ge=0, description="purchase counts kept beside each prompt (columns count_items / "
        "count_values, not shown in the prompt): the household's N most bought items before the "
        "cut with their counts, read by the copy prior with model.repeat_counts; 0 = none"
    )
    novel_items: int = Field(
        100, ge=0, description="novelty lists kept beside each prompt (columns novel_items / "
        "novel_values, not shown in the prompt): the N most bought training items of the "
        "categories (at discover_level) absent from the household's whole history before the "
        "cut, read by the copy prior with model.novelty; 0 = none (and none without category "
        "paths)"
    )
    min_history: int = Field(1, ge=1, description="fewest items before a cut (training samples)")
    # Mixture: total_samples split by weight over the supported, enabled tasks; samples_per_task
    # fixes the count of the tasks it names (the weights then share out the rest).
    # LC-Rec-style alignment samples (ours): from the catalogue alone, a query phrase, a
    # category or an item's own text -> the prefixes of the items it names. They give the new
    # prefix tokens a meaning that 500 samples per instruction task cannot.
    align_samples: int = Field(
        0, ge=0, description="catalogue alignment samples added to the SFT data (task 'Align'; "
        "a third each from query phrases, categories and item texts), no user in the prompt"
    )
    align_max_positives: int = Field(
        64, ge=1, description="most popular items of a phrase kept as its positives"
    )
    total_samples: int = Field(20_000, ge=0)
    weights: dict[TaskName, float] = Field(default_factory=default_weights)
    samples_per_task: dict[TaskName, int] = Field(default_factory=dict)
    min_task_samples: int = Field(
        20, ge=1, description="a task with fewer training candidates than this is skipped"
    )
    eval_instances_per_task: int | None = Field(
        None, ge=1, description="cap per task and split (seeded subset); None = all"
    )
    valid_instances_per_task: int | None = Field(
        None, ge=1, description="validation cap per task when it should differ (tau choice "
        "needs fewer than a low-noise test); None = eval_instances_per_task"
    )
    # Amazon Beauty reports JustForYou (next item) over every user, as the published table does,
    # while the instruction tasks keep a few hundred instances each.
    # Left out of the config dump (and so of the stage hash) while empty, so runs made before
    # this option existed stay fresh.
    task_caps: dict[TaskName, SplitCaps] = Field(
        default_factory=dict, exclude_if=lambda v: not v,
        description="per-task caps overriding eval_instances_per_task / "
        "valid_instances_per_task for the split they name, e.g. "
        "{JustForYou: {test: all, valid: 2000}}"
    )
    # Which basket of a user in an evaluation window becomes the instance: strictly the first
    # (dropped when the task admits none of its items), or the first that holds a target.
    eval_basket: Literal["first", "first_with_target"] = "first"
    # Non-products (coupons, fuel, store services): never targets of a task other than
    # JustForYou, matched against every level of an item's category path.
    exclude_categories: list[str] = Field(
        default_factory=lambda: ["COUPON", "COUPON/MISC ITEMS", "COUPONS/STORE & MFG", "FUEL",
                                 "KIOSK-GAS", "MISC SALES TRAN", "GASOLINE-REG UNLEADED"]
    )
    longtail_quantile: float = Field(
        0.5, gt=0, lt=1, description="long tail = training count below this quantile of items"
    )
    category_level: int = Field(1, ge=0, description="path level named by Category (0 = top)")
    discover_level: int = Field(1, ge=0, description="path level whose novelty Discover asks")
    discover_min_history: int = Field(
        50, ge=1, description="items a user must have bought before a Discover cut (data start "
        "makes everything look new to short histories)"
    )
    seasons: dict[str, list[int]] = Field(default_factory=default_seasons)
    season_min_lift: float = Field(1.5, gt=1)
    season_min_count: int = Field(10, ge=1, description="purchases in the season (training)")
    holidays: list[HolidayWindow] = Field(default_factory=default_holidays)
    holiday_min_lift: float = Field(2.0, gt=1)
    holiday_min_count: int = Field(5, ge=1, description="purchases inside the holiday window")
    lift_smoothing: float = Field(
        5.0, ge=0, description="pseudo-count added to both rates of a lift"
    )
    examples_per_task: int = Field(3, ge=0, description="decoded examples written per task")
    seed: int | None = Field(None, description="None = the run seed")

    @field_validator("enabled")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("tasks.enabled must name at least one task")
        return list(dict.fromkeys(v))

    @field_validator("system_prompt")
    @classmethod
    def _not_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("tasks.system_prompt is blank; leave it out for the default")
        return v

    def eval_cap(self, task: str, split: str) -> int | None:
        """How many ``split`` instances of ``task`` are kept (None = all)."""
        caps = self.task_caps.get(task)  # type: ignore[call-overload]
        cap = None if caps is None else getattr(caps, split)
        if cap is not None:
            return None if cap == "all" else int(cap)
        if split == "valid" and self.valid_instances_per_task is not None:
            return self.valid_instances_per_task
        return self.eval_instances_per_task

    @field_validator("weights")
    @classmethod
    def _weights_nonneg(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: w for k, w in v.items() if w < 0}
        if bad:
            raise ValueError(f"tasks.weights must be >= 0, got {bad}")
        return v

    @field_validator("samples_per_task")
    @classmethod
    def _counts_nonneg(cls, v: dict[str, int]) -> dict[str, int]:
        bad = {k: n for k, n in v.items() if n < 0}
        if bad:
            raise ValueError(f"tasks.samples_per_task must be >= 0, got {bad}")
        return v

    @field_validator("seasons")
    @classmethod
    def _months(cls, v: dict[str, list[int]]) -> dict[str, list[int]]:
        seen: dict[int, str] = {}
        for name, months in v.items():
            for m in months:
                if not 1 <= m <= 12:
                    raise ValueError(f"tasks.seasons[{name!r}]: month {m} is not in 1..12")
                if m in seen:
                    raise ValueError(
                        f"tasks.seasons: month {m} is in both {seen[m]!r} and {name!r}"
                    )
                seen[m] = name
        return v

    @field_validator("holidays")
    @classmethod
    def _holidays_unique(cls, v: list[HolidayWindow]) -> list[HolidayWindow]:
        names = [h.name for h in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"tasks.holidays: duplicate name(s) {dup}")
        return v
