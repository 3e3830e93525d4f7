"""The nearline job: ingest new interactions, recompute the users they touch, publish to U2I.

``run_nearline`` (``sigma nearline --events FILE``), in order:

1. hash the events file; if the U2I store already holds a version published from that hash,
   stop (a rerun after success is a no-op);
2. validate it like any input file (the data layer's readers and the run's
   ``data.files.interaction_columns`` / ``timestamp_unit``), map raw ids to indices, give every
   basket the next basket number of its user, and append it as the next
   ``<run>/serving/events/<seq>.parquet`` (:mod:`~sigmarec.serving.events`) by rename, the hash
   in the file's metadata; if a batch with the same hash is already there (a crash after
   appending) it is not appended again;
3. reload the runtime (the histories now hold the new events) and recompute, for every touched
   user and every task of ``serving.nearline.tasks``, the top ``serving.nearline.k`` items, with
   prompt KV-cache reuse (:mod:`~sigmarec.serving.kv_cache`) for SIGMA;
4. publish all lists as ONE new U2I version (one transaction), tagged with the hash.

A crash anywhere leaves the store at its previous version (nothing of step 4 is visible until
its commit) and the run directory with whole files only (renames); rerunning the same command
resumes from step 3. A lock file keeps two jobs off one run directory at a time.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from sigmarec.config import SigmaConfig
from sigmarec.core.atomic import atomic_path
from sigmarec.errors import ConfigError, DataError, SigmaError
from sigmarec.serving.events import EVENT_COLUMNS, events_dir, load_events
from sigmarec.serving.kv_cache import (
    KVCacheStore,
    PromptKV,
    ReuseStats,
    kv_dir,
    model_fingerprint,
    prompt_forward,
    token_keys,
)
from sigmarec.serving.request import SIGMA, RecRequest, RequestError
from sigmarec.serving.runtime import Runtime
from sigmarec.serving.store import U2IRow, open_store

if TYPE_CHECKING:
    from sigmarec.generation.decode import SigmaDecoder
    from sigmarec.generation.fusion import Candidates
    from sigmarec.model.batch import SFTExample

log = logging.getLogger("sigmarec")

HASH_KEY = b"sigmarec.source_sha256"
SOURCE_KEY = b"sigmarec.source_file"
# Seconds to sleep after each batch: lets the crash-safety test kill the job mid-run.
PAUSE_ENV = "SIGMAREC_NEARLINE_PAUSE_S"
# The basket column of an events file when data.files.interaction_columns maps none.
BASKET_COLUMN = "basket_id"


class NearlineBusy(SigmaError):
    pass


@dataclass
class NearlineResult:
    source: str  # "events:<sha256>"
    events_file: str  # the appended <seq>.parquet
    appended: bool  # False when a crashed run had appended it already
    already_published: bool
    version: int | None
    users: int = 0
    rows: int = 0
    tasks: list[str] = field(default_factory=list)
    reuse: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """One nearline job per run directory; the OS drops the lock when the process dies."""
    path = Path(run_dir) / "serving" / "nearline.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise NearlineBusy(f"{path}: another `sigma nearline` is running on this run "
                               "directory") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- ingesting


def read_new_events(path: Path, cfg: SigmaConfig, runtime: Runtime) -> pd.DataFrame:
    """Validate an events file against the run: columns as ``data.files.interaction_columns``
    map them (the basket column: that map's, else ``basket_id`` if present, else every row is
    a basket), known users and items, timestamps not before the user's last known interaction.
    Returns the events contract's frame, baskets numbered after each user's last one."""
    from sigmarec.data.sources.files import _interactions, read_table

    fs = cfg.data.files.model_copy(update={"interactions": Path(path)}, deep=True)
    m = fs.interaction_columns
    if m.basket is None and BASKET_COLUMN in read_table(path, "events").columns:
        # A run trained on a packaged dataset maps no basket column; events name theirs.
        m.basket = BASKET_COLUMN
    raw, src = _interactions(fs)  # reads, checks columns/ids/timestamps, errors name row+column
    users = raw["user_id"].map(runtime.user_index)
    _first_unknown(users, raw["user_id"], src, m.user, "unknown user (nearline takes events of "
                   "users the run knows; new users need a new training run)")
    items = raw["item_id"].map(runtime.item_index)
    _first_unknown(items, raw["item_id"], src, m.item, "unknown item (add new items with "
                   "`sigma items add` first)")
    ev = pd.DataFrame({"user_idx": users.astype(np.int64), "item_idx": items.astype(np.int64),
                       "timestamp": raw["timestamp"].to_numpy("datetime64[ns]"),
                       "basket_id": raw["basket_id"], "_row": np.arange(len(raw))})
    last_ts, last_basket = _last_known(runtime)
    before = ev["timestamp"].to_numpy() < last_ts[ev["user_idx"].to_numpy()]
    if before.any():
        r = int(np.flatnonzero(before)[0])
        u = int(ev["user_idx"].iloc[r])
        raise DataError(f"{src}: row {r}, column '{m.timestamp}': timestamp "
                        f"{ev['timestamp'].iloc[r]} is before user {raw['user_id'].iloc[r]!r}'s "
                        f"last known interaction ({pd.Timestamp(last_ts[u])}); nearline only "
                        "appends to a history")
    # As the data stage does: a row without a basket id is a basket of its own, a basket is
    # ordered by its first timestamp, and an item listed twice in a basket counts once.
    no_basket = ev["basket_id"].isna()
    ev.loc[no_basket, "basket_id"] = "row:" + ev.loc[no_basket, "_row"].astype(str)
    ev = ev.drop_duplicates(["user_idx", "basket_id", "item_idx"], keep="first")
    grp = ev.groupby(["user_idx", "basket_id"], sort=False)
    ev["_bt"] = grp["timestamp"].transform("min")
    ev["_bf"] = grp["_row"].transform("min")
    ev = ev.sort_values(["user_idx", "_bt", "_bf", "_row"], kind="stable")
    rank = ev.groupby("user_idx", sort=False)["basket_id"].transform(
        lambda s: pd.factorize(s)[0]).to_numpy(np.int64)
    ev["basket"] = last_basket[ev["user_idx"].to_numpy()] + 1 + rank
    return ev[list(EVENT_COLUMNS)].reset_index(drop=True).astype(
        {"user_idx": np.int64, "item_idx": np.int64, "basket": np.int64})


def _first_unknown(idx: pd.Series, raw: pd.Series, src: str, column: str, what: str) -> None:
    bad = idx.isna().to_numpy()
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        raise DataError(f"{src}: row {r}, column '{column}': {what} (value {raw.iloc[r]!r})")


def _last_known(runtime: Runtime) -> tuple[np.ndarray, np.ndarray]:
    """Per user, the last timestamp and basket number of the data and published events."""
    data = runtime.data
    frames = [data.interactions[["user_idx", "timestamp", "basket"]],
              load_events(runtime.run_dir)[["user_idx", "timestamp", "basket"]]]
    allv = pd.concat([f for f in frames if len(f)], ignore_index=True)
    g = allv.groupby("user_idx")
    ts = np.full(data.n_users, np.datetime64("1677-09-22", "ns"), dtype="datetime64[ns]")
    basket = np.full(data.n_users, -1, dtype=np.int64)
    ts[g["timestamp"].max().index.to_numpy()] = g["timestamp"].max().to_numpy("datetime64[ns]")
    basket[g["basket"].max().index.to_numpy()] = g["basket"].max().to_numpy(np.int64)
    return ts, basket


def ingested_batch(run_dir: Path, sha: str) -> Path | None:
    """The published events batch carrying this content hash, if any."""
    for f in sorted(events_dir(run_dir).glob("[0-9]*.parquet")):
        meta = pq.read_schema(f).metadata or {}
        if meta.get(HASH_KEY, b"").decode() == sha:
            return f
    return None


def append_events(run_dir: Path, events: pd.DataFrame, sha: str, source: Path) -> Path:
    """Publish ``events`` as the next batch file (write to a temporary name, then rename)."""
    folder = events_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    seqs = [int(f.stem) for f in folder.glob("[0-9]*.parquet") if f.stem.isdigit()]
    path = folder / f"{max(seqs, default=0) + 1:08d}.parquet"
    table = pa.Table.from_pandas(events, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), HASH_KEY: sha.encode(),
                                           SOURCE_KEY: str(Path(source).resolve()).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


# --------------------------------------------------------------------------- recomputing


@dataclass
class Recomputer:
    """Top-k lists of (user, task) pairs through the runtime, with prompt KV reuse for SIGMA.

    With reuse, step 1 (the prompt forward) is :func:`~sigmarec.serving.kv_cache.prompt_forward`
    instead of the decoder's own, and steps 2-3 are the runtime's decoder and fusion unchanged
    (:meth:`Runtime.sigma_lists` with the cached step 1); the decoder continues from the cache
    through :meth:`~sigmarec.generation.decode.SigmaDecoder.candidates_from_cache`."""

    runtime: Runtime
    k: int
    model: str = SIGMA
    kv: KVCacheStore | None = None

    def lists(self, pairs: Sequence[tuple[int, str]], stats: ReuseStats
              ) -> list[tuple[np.ndarray, np.ndarray]]:
        rt = self.runtime
        reqs = [RecRequest(user_id=str(rt.data.users["user_id"].iat[u]), task=t, k=self.k,
                           model=self.model) for u, t in pairs]
        if self.model != SIGMA or self.kv is None:
            out = []
            for ranked in rt.recommend(reqs):
                idx = np.array([rt.item_idx(r.item_id) for r in ranked], dtype=np.int64)
                out.append((idx, np.array([r.score for r in ranked])))
            return out
        resolved = [rt.resolve(r) for r in reqs]
        kv = self.kv

        def from_cache(decoder: SigmaDecoder, examples: list[SFTExample], n: int,
                       allow: np.ndarray | None) -> Candidates:
            model = decoder.model
            cached: list[PromptKV | None] = [
                kv.best(u, token_keys(e, model.item_token_id))
                for (u, _), e in zip(pairs, examples, strict=True)]
            batch = decoder.batch(examples)
            cache, entries, st = prompt_forward(model, batch, examples, cached)
            cands = decoder.candidates_from_cache(cache, len(examples), n, [allow])[0]
            stats.add(st)
            if entries is not None:
                for (u, t), e in zip(pairs, entries, strict=True):
                    kv.put(u, t, e)
            return cands

        items, scores = rt.sigma_lists(resolved, from_cache)
        out = []
        for b in range(len(pairs)):
            keep = (items[b] >= 0) & np.isfinite(scores[b])
            out.append((items[b][keep][:self.k], scores[b][keep][:self.k]))
        return out


def check_tasks(runtime: Runtime, tasks: Sequence[str], model: str) -> list[str]:
    """The configured tasks, checked once before any work (a bad entry is a ConfigError)."""
    if not tasks:
        raise ConfigError("serving.nearline.tasks is empty; name at least one task")
    if model != SIGMA and model not in runtime.model_names:
        raise ConfigError(f"serving.nearline.model {model!r}: this run serves "
                          f"{', '.join(runtime.model_names)}")
    probe = str(runtime.data.users["user_id"].iat[0])
    out = []
    for t in tasks:
        try:
            out.append(runtime.resolve(RecRequest(user_id=probe, task=t, model=model)).task)
        except RequestError as e:
            raise ConfigError(f"serving.nearline.tasks: {t!r}: {e.message} (nearline computes "
                              "tasks that need no request parameters)") from None
    return list(dict.fromkeys(out))


def open_kv(run_dir: Path, cfg: SigmaConfig) -> KVCacheStore:
    fp = model_fingerprint(Path(run_dir) / "training" / "model", cfg.backbone)
    return KVCacheStore(kv_dir(run_dir), fp, int(cfg.serving.nearline.kv_cache_max_mb * 2**20))


def run_nearline(run_dir: Path, cfg: SigmaConfig, events_path: Path,
                 runtime: Runtime | None = None) -> NearlineResult:
    """The whole job (see the module docstring)."""
    from sigmarec.core.seed import set_threads

    run_dir, events_path = Path(run_dir), Path(events_path)
    ncfg = cfg.serving.nearline
    set_threads(cfg.threads)
    t0 = time.perf_counter()
    if not events_path.is_file():
        raise DataError(f"{events_path}: events file not found")
    sha = file_sha256(events_path)
    source = f"events:{sha}"
    store = open_store(cfg.serving.u2i_store, run_dir)
    with run_lock(run_dir), store:
        done = store.find_source(source)
        if done is not None:
            batch = ingested_batch(run_dir, sha)
            log.info("nearline: %s was published as U2I version %d; nothing to do", events_path,
                     done.version)
            return NearlineResult(source, str(batch or ""), False, True, done.version,
                                  rows=done.n_rows, tasks=list(done.meta.get("tasks", [])))
        rt = runtime if runtime is not None else Runtime.load(run_dir, cfg)
        t_load = time.perf_counter()
        tasks = check_tasks(rt, ncfg.tasks, ncfg.model)
        existing = ingested_batch(run_dir, sha)
        if existing is None:
            events = read_new_events(events_path, cfg, rt)
            batch_file = append_events(run_dir, events, sha, events_path)
            log.info("nearline: appended %d events of %d users as %s", len(events),
                     events["user_idx"].nunique(), batch_file)
        else:
            # A previous run appended the batch and died before publishing: finish it.
            batch_file = existing
            events = pd.read_parquet(existing)
            log.info("nearline: %s already holds these events (an interrupted run); "
                     "recomputing and publishing", existing)
        rt.reload()
        t_ingest = time.perf_counter()
        users = np.unique(events["user_idx"].to_numpy(np.int64))
        stats = ReuseStats()
        kv = open_kv(run_dir, cfg) if ncfg.kv_cache and ncfg.model == SIGMA else None
        rec = Recomputer(rt, ncfg.k, ncfg.model, kv)
        rows = _recompute(rec, users, tasks, ncfg.batch_size, stats)
        t_rec = time.perf_counter()
        version = store.publish(rows, source=source, meta={
            "events_file": batch_file.name, "tasks": tasks, "users": int(len(users)),
            "model": ncfg.model, "kv_cache": kv is not None, "reuse": stats.as_dict()})
        store.prune(ncfg.keep_versions)
        t_pub = time.perf_counter()
    log.info("nearline: published U2I version %d (%d rows, %d users x %d tasks)", version,
             len(rows), len(users), len(tasks))
    return NearlineResult(
        source=source, events_file=batch_file.name, appended=existing is None,
        already_published=False, version=version, users=int(len(users)), rows=len(rows),
        tasks=tasks, reuse=stats.as_dict() if kv is not None else {},
        seconds={"load": round(t_load - t0, 2), "ingest": round(t_ingest - t_load, 2),
                 "recompute": round(t_rec - t_ingest, 2), "publish": round(t_pub - t_rec, 2)})


def _recompute(rec: Recomputer, users: np.ndarray, tasks: Sequence[str], batch_size: int,
               stats: ReuseStats) -> list[U2IRow]:
    rt = rec.runtime
    pause = float(os.environ.get(PAUSE_ENV, "0") or 0)
    rows: list[U2IRow] = []
    # Task by task: a later task's prompt reuses the KV an earlier task just stored for the
    # same user (they differ only in the request line).
    pairs = [(int(u), t) for t in tasks for u in users]
    for s in range(0, len(pairs), batch_size):
        part = pairs[s:s + batch_size]
        for (u, t), (items, scores) in zip(part, rec.lists(part, stats), strict=True):
            rows.append(U2IRow(user_id=str(rt.data.users["user_id"].iat[u]), task=t,
                               items=[str(x) for x in rt.item_ids[items]],
                               scores=[float(x) for x in scores], model=rec.model))
        if pause:
            time.sleep(pause)
    return rows
