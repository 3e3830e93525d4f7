"""Speed of the SFT loop: s/step and tokens/s for the progress bar, and the time-budget check.

:class:`StepPace` keeps the recent steps of one ``train_sigma`` call (the first one, which pays
for warm-up, is left out once there are others); :func:`budget_warning` is the pure check behind
the one warning logged when the estimated wall time is far above ``training.time_budget_s``.
"""

from __future__ import annotations

from collections import deque

WARMUP_STEPS = 3  # steps of a call after which the remaining time is estimated
BUDGET_FACTOR = 2.0  # warn when the estimate exceeds this multiple of the budget


class StepPace:
    """Running averages over the last ``window`` steps (the call's first step excluded)."""

    def __init__(self, window: int = 20) -> None:
        self.steps = 0
        self.total_seconds = 0.0
        self.total_tokens = 0
        self._first: tuple[float, int] | None = None
        self._recent: deque[tuple[float, int]] = deque(maxlen=window)

    def update(self, seconds: float, tokens: int) -> None:
        self.steps += 1
        self.total_seconds += seconds
        self.total_tokens += tokens
        if self._first is None:
            self._first = (seconds, tokens)
        else:
            self._recent.append((seconds, tokens))

    def _window(self) -> list[tuple[float, int]]:
        return list(self._recent) or ([self._first] if self._first else [])

    @property
    def seconds_per_step(self) -> float | None:
        w = self._window()
        return sum(s for s, _ in w) / len(w) if w else None

    @property
    def tokens_per_s(self) -> float | None:
        w = self._window()
        seconds = sum(s for s, _ in w)
        return sum(t for _, t in w) / seconds if w and seconds > 0 else None

    def postfix(self) -> dict[str, str]:
        """``{"s/step": ..., "tok/s": ...}`` for ``tqdm.set_postfix``."""
        sps, tps = self.seconds_per_step, self.tokens_per_s
        out: dict[str, str] = {}
        if sps is not None:
            out["s/step"] = f"{sps:.3g}"
        if tps is not None:
            out["tok/s"] = f"{tps:.0f}"
        return out


def budget_warning(seconds_per_step: float, remaining_steps: int, elapsed_s: float,
                   budget_s: float | None, precision: str) -> str | None:
    """The warning text when ``elapsed + remaining x s/step`` exceeds 2x the budget, else None."""
    if budget_s is None:
        return None
    estimate = elapsed_s + max(0, remaining_steps) * seconds_per_step
    if estimate <= BUDGET_FACTOR * budget_s:
        return None
    hint = ("on CPUs without native bf16 (avx512_bf16/amx_bf16) use mixed_precision: auto or no"
            if precision == "bf16" else "lower training.steps or use faster hardware")
    return (f"sft: estimated wall time {estimate:.0f}s ({remaining_steps} steps left at "
            f"{seconds_per_step:.3g} s/step, precision {precision}) is more than "
            f"{BUDGET_FACTOR:g}x the time budget of {budget_s:.0f}s; {hint}")
