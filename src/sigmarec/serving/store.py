"""The user-to-item (U2I) store: precomputed recommendations that online slots read.

A *version* is one publication by the nearline job: rows for the (user, task) pairs it
recomputed. Reading ``(user, task)`` returns the row of the newest published version that holds
one, so a job that refreshes ten users leaves everybody else's rows in place. A version is
written and published in ONE transaction (its rows and its ``versions`` row together): a
reader sees all of it or none of it, and a job killed mid-way leaves the previous versions as
they were. ``versions.source`` records what a version was computed from (the content hash of an
events file), so a rerun can tell that a batch was already published.

:class:`U2IStore` is the interface; :class:`SQLiteStore` (stdlib ``sqlite3``, WAL mode, so
readers never block the writer) the embedded backend. A networked database is a new class with
the same five methods registered in :data:`BACKENDS`; ``serving.u2i_store`` then names it
(``postgres:...``) and nothing else changes.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from sigmarec.errors import ConfigError, SigmaError

SCHEMA_VERSION = 1


class StoreError(SigmaError):
    """The store cannot be read or written (a damaged file, a bad row, a locked database)."""


@dataclass(frozen=True)
class U2IRow:
    """One (user, task) list to publish: raw item ids, best first, with their scores."""

    user_id: str
    task: str
    items: Sequence[str]
    scores: Sequence[float]
    model: str = "sigma"


@dataclass(frozen=True)
class U2IEntry:
    """A published list as a reader gets it."""

    user_id: str
    task: str
    version: int
    items: list[str]
    scores: list[float]
    model: str
    published_at: str


@dataclass(frozen=True)
class VersionInfo:
    version: int
    published_at: str  # ISO 8601, UTC
    n_rows: int
    source: str | None
    meta: dict[str, Any] = field(default_factory=dict)


class U2IStore(ABC):
    """What the nearline job writes and the service reads; see the module docstring."""

    @abstractmethod
    def publish(self, rows: Iterable[U2IRow], *, source: str | None = None,
                meta: Mapping[str, Any] | None = None) -> int:
        """Write ``rows`` as a new version and publish it atomically; returns its number.
        ``source`` (unique across versions) names what the rows were computed from."""

    @abstractmethod
    def get(self, user_id: str, task: str, version: int | None = None) -> U2IEntry | None:
        """The (user, task) row of the newest published version (at or below ``version`` when
        given) that holds one; None when there is none."""

    @abstractmethod
    def latest_version(self) -> int | None:
        """The newest published version, None for an empty store."""

    @abstractmethod
    def versions(self) -> list[VersionInfo]:
        """Every published version, oldest first."""

    @abstractmethod
    def find_source(self, source: str) -> VersionInfo | None:
        """The version published from ``source``, if any (makes reruns idempotent)."""

    def prune(self, keep: int) -> int:
        """Drop rows no reader of the newest ``keep`` versions can reach; returns how many.
        Optional: a backend with cheap storage may keep everything."""
        return 0

    def close(self) -> None:  # noqa: B027 - optional for backends without connections
        """Release connections."""

    def __enter__(self) -> U2IStore:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


# ------------------------------------------------------------------------------------ SQLite

_SCHEMA = """
CREATE TABLE IF NOT EXISTS store_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS versions (
    version INTEGER PRIMARY KEY,
    published_at TEXT NOT NULL,
    n_rows INTEGER NOT NULL,
    source TEXT UNIQUE,
    meta TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS u2i (
    user_id TEXT NOT NULL,
    task TEXT NOT NULL,
    version INTEGER NOT NULL REFERENCES versions(version),
    model TEXT NOT NULL,
    items TEXT NOT NULL,
    scores TEXT NOT NULL,
    PRIMARY KEY (user_id, task, version)
) WITHOUT ROWID;
"""


class SQLiteStore(U2IStore):
    """The embedded backend: one SQLite file, WAL journal, one connection per thread.

    Reading a store that does not exist yet is not an error (every lookup is empty) and
    creates nothing; the first :meth:`publish` creates the file.
    """

    def __init__(self, path: Path, timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.timeout_s = timeout_s
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------- connections
    def _connect(self, create: bool) -> sqlite3.Connection | None:
        con = getattr(self._local, "con", None)
        if con is not None:
            return con
        if not self.path.is_file():
            if not create:
                return None
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
            con = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None,
                                  check_same_thread=False)
            con.execute("PRAGMA journal_mode=WAL")
            # FULL: a published version survives a power cut too, not only a killed process.
            con.execute("PRAGMA synchronous=FULL")
            con.execute("PRAGMA foreign_keys=ON")
            con.executescript(_SCHEMA)
            row = con.execute("SELECT value FROM store_meta WHERE key='schema'").fetchone()
            if row is None:
                con.execute("INSERT OR IGNORE INTO store_meta VALUES ('schema', ?)",
                            (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise StoreError(f"{self.path}: U2I store schema {row[0]}, this version of "
                                 f"sigmarec reads schema {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path}: cannot open the U2I store ({e})") from None
        self._local.con = con
        with self._lock:
            self._all.append(con)
        return con

    def close(self) -> None:
        with self._lock:
            for con in self._all:
                con.close()
            self._all.clear()
        self._local = threading.local()

    # ------------------------------------------------------------------------------ writing
    def publish(self, rows: Iterable[U2IRow], *, source: str | None = None,
                meta: Mapping[str, Any] | None = None) -> int:
        con = self._connect(create=True)
        assert con is not None
        records = [_record(r) for r in rows]
        keys = [(r[0], r[1]) for r in records]
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise StoreError(f"publish: (user {dup[0]!r}, task {dup[1]!r}) appears twice in "
                             "one version")
        try:
            # IMMEDIATE takes the write lock now: two jobs never pick the same version number.
            con.execute("BEGIN IMMEDIATE")
            try:
                if source is not None and con.execute(
                        "SELECT 1 FROM versions WHERE source=?", (source,)).fetchone():
                    raise StoreError(f"{self.path}: source {source!r} is already published")
                version = int(con.execute(
                    "SELECT COALESCE(MAX(version), 0) + 1 FROM versions").fetchone()[0])
                con.execute("INSERT INTO versions VALUES (?, ?, ?, ?, ?)",
                            (version, _now(), len(records), source,
                             json.dumps(dict(meta or {}), sort_keys=True, default=str)))
                con.executemany("INSERT INTO u2i VALUES (?, ?, ?, ?, ?, ?)",
                                [(u, t, version, m, i, s) for u, t, m, i, s in records])
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path}: publishing failed, nothing was published ({e})"
                             ) from None
        return version

    def prune(self, keep: int) -> int:
        if keep < 1:
            raise ConfigError(f"keep must be at least 1, got {keep}")
        con = self._connect(create=False)
        if con is None:
            return 0
        vs = [v for (v,) in con.execute("SELECT version FROM versions ORDER BY version DESC")]
        if len(vs) <= keep:
            return 0
        floor = vs[keep - 1]  # the oldest version a reader may still pin
        con.execute("BEGIN IMMEDIATE")
        try:
            # A row older than the floor is unreachable once a newer row of the same
            # (user, task) exists at or below the floor.
            cur = con.execute(
                "DELETE FROM u2i AS old WHERE old.version < ? AND EXISTS (SELECT 1 FROM u2i AS n "
                "WHERE n.user_id = old.user_id AND n.task = old.task AND n.version > old.version "
                "AND n.version <= ?)", (floor, floor))
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        return int(cur.rowcount)

    # ------------------------------------------------------------------------------ reading
    def get(self, user_id: str, task: str, version: int | None = None) -> U2IEntry | None:
        con = self._connect(create=False)
        if con is None:
            return None
        row = con.execute(
            "SELECT u.version, u.model, u.items, u.scores, v.published_at FROM u2i u "
            "JOIN versions v ON v.version = u.version WHERE u.user_id=? AND u.task=? "
            "AND u.version <= COALESCE(?, u.version) ORDER BY u.version DESC LIMIT 1",
            (str(user_id), str(task), version)).fetchone()
        if row is None:
            return None
        return U2IEntry(user_id=str(user_id), task=str(task), version=int(row[0]), model=row[1],
                        items=json.loads(row[2]), scores=json.loads(row[3]),
                        published_at=row[4])

    def latest_version(self) -> int | None:
        con = self._connect(create=False)
        if con is None:
            return None
        return con.execute("SELECT MAX(version) FROM versions").fetchone()[0]

    def versions(self) -> list[VersionInfo]:
        con = self._connect(create=False)
        if con is None:
            return []
        return [_version(r) for r in con.execute(
            "SELECT version, published_at, n_rows, source, meta FROM versions ORDER BY version")]

    def find_source(self, source: str) -> VersionInfo | None:
        con = self._connect(create=False)
        if con is None:
            return None
        row = con.execute("SELECT version, published_at, n_rows, source, meta FROM versions "
                          "WHERE source=?", (source,)).fetchone()
        return _version(row) if row else None

    def integrity_check(self) -> str:
        """SQLite's own check of the file ("ok" when intact)."""
        con = self._connect(create=False)
        if con is None:
            return "ok"
        return str(con.execute("PRAGMA integrity_check").fetchone()[0])


def _record(r: U2IRow) -> tuple[str, str, str, str, str]:
    items = [str(i) for i in r.items]
    scores = [float(s) for s in r.scores]
    if len(items) != len(scores):
        raise StoreError(f"publish: user {r.user_id!r}, task {r.task!r}: {len(items)} items but "
                         f"{len(scores)} scores")
    # JSON has no NaN/inf; a non-finite score is a bug upstream, not something to store.
    if any(s != s or s in (float("inf"), float("-inf")) for s in scores):
        raise StoreError(f"publish: user {r.user_id!r}, task {r.task!r}: non-finite score")
    return (str(r.user_id), str(r.task), str(r.model), json.dumps(items), json.dumps(scores))


def _version(row: Sequence[Any]) -> VersionInfo:
    return VersionInfo(version=int(row[0]), published_at=row[1], n_rows=int(row[2]),
                       source=row[3], meta=json.loads(row[4]))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


# ---------------------------------------------------------------------------------- opening


def _sqlite(location: str, run_dir: Path) -> U2IStore:
    path = Path(location).expanduser()
    if not path.is_absolute():
        path = Path(run_dir) / "serving" / path
    return SQLiteStore(path)


# backend name -> factory(location, run_dir). A networked backend registers itself here.
BACKENDS: dict[str, Callable[[str, Path], U2IStore]] = {"sqlite": _sqlite}


def open_store(spec: str, run_dir: Path) -> U2IStore:
    """The store ``serving.u2i_store`` names: ``backend:location``, e.g. ``sqlite:u2i.sqlite``
    (a relative SQLite path lives in ``<run>/serving/``; an absolute one is used as is)."""
    backend, sep, location = str(spec).partition(":")
    if not sep or not location.strip():
        raise ConfigError(f"serving.u2i_store {spec!r}: expected 'backend:location', e.g. "
                          "'sqlite:u2i.sqlite'")
    factory = BACKENDS.get(backend.strip().lower())
    if factory is None:
        raise ConfigError(f"serving.u2i_store {spec!r}: unknown backend {backend!r}; known: "
                          f"{', '.join(sorted(BACKENDS))}")
    return factory(location.strip(), Path(run_dir))
