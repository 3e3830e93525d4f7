"""What each stage records about itself: config, versions, seed, wall time and peak memory."""

from __future__ import annotations

import platform
import subprocess
import threading
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

_TRACKED = (
    "sigmarec",
    "torch",
    "numpy",
    "pandas",
    "pyarrow",
    "scipy",
    "pydantic",
    "transformers",
    "peft",
    "accelerate",
    "faiss-cpu",
)


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _TRACKED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_commit(path: Path | None = None) -> str | None:
    try:
        res = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=path or Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() or None if res.returncode == 0 else None


class PeakMemory:
    """Samples this process's resident memory in a thread; ``peak_mb`` after ``stop``."""

    def __init__(self, interval: float = 0.1) -> None:
        self._proc = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    def sample(self) -> float:
        """Peak resident memory so far, in MiB."""
        self.peak = max(self.peak, self._proc.memory_info().rss)
        return round(self.peak / 2**20, 1)
