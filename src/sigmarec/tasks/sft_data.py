"""Multi-task SFT samples and evaluation instances (the prompt they render to is
:mod:`sigmarec.tasks.prompts`, a row's history columns :mod:`sigmarec.tasks.columns`).

Training samples (``split == "train"``) come from the training period only: a cut sits at a
basket boundary inside it, the history is everything before the cut (the prompt shows its last
``history_len`` items) and the target is one item of the basket that starts at the cut which the
task admits; ``targets`` lists every item of that basket that satisfies the task's rule under
the same instruction (the other positives, so training can avoid them as negatives). No label
and no history item can come from the validation or test period: this is asserted.

Evaluation instances (``valid`` / ``test``) follow ``ProcessedData.instances``: per user (and
per holiday for Holiday) the first basket in the evaluation window; history = every earlier
position; targets = the items of that basket the task admits. JustForYou copies the data
stage's instances (same ids). Evaluation instructions use the held-out paraphrases.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from sigmarec.data.processed import ProcessedData
from sigmarec.tasks.channels import novelty_lister
from sigmarec.tasks.columns import channel_columns, history_listers, prompt_columns
from sigmarec.tasks.config import TASK_NAMES, TasksConfig
from sigmarec.tasks.definitions import Cut, RowView, Task
from sigmarec.tasks.history import most_bought, purchase_counts
from sigmarec.tasks.prompt_style import SYSTEM_PROMPT
from sigmarec.tasks.prompts import (
    RenderedPrompt,
    decode_sample,
    item_description,
    prefix_tokens,
    render_prompt,
)
from sigmarec.tasks.registry import build_tasks, supported
from sigmarec.tasks.resources import TaskResources, build_resources
from sigmarec.tasks.text import display_category

log = logging.getLogger("sigmarec")



def train_columns() -> list[str]:
    """The columns of the training samples (the copy prior's history channels' from the
    registry)."""
    return ["sample_id", "split", "task", "user_idx", "hist_len", "history", "frequent",
            *channel_columns(),
            "target", "targets", "timestamp", "instruction", "params", "profile"]


def eval_columns() -> list[str]:
    """The columns of the evaluation instances."""
    return ["instance_id", "split", "task", "user_idx", "hist_len", "targets", "timestamp",
            "instruction", "params", "profile", "history", "frequent", *channel_columns()]


@dataclass
class Baskets:
    """Rows of ``data.interactions`` grouped into baskets (contiguous by construction)."""

    rows: RowView
    gid: np.ndarray  # basket id per row
    start: np.ndarray  # first row of each basket
    end: np.ndarray  # one past its last row
    hist_len: np.ndarray
    timestamp: np.ndarray  # datetime64 per basket
    split: np.ndarray  # per basket: "train"/"valid"/"test", "mixed" if its rows disagree
    user: np.ndarray
    holiday: np.ndarray  # per basket
    season: np.ndarray  # per basket
    n_train: np.ndarray  # per user: training rows (a prefix of the sequence)


@dataclass
class SFTData:
    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame
    stats: dict[str, Any]
    skipped: dict[str, str]
    resources: TaskResources
    tasks: dict[str, Task] = field(default_factory=dict)

    def split(self, name: str) -> pd.DataFrame:
        return {"train": self.train, "valid": self.valid, "test": self.test}[name]


def build_baskets(data: ProcessedData, res: TaskResources) -> Baskets:
    inter = data.interactions
    u = inter["user_idx"].to_numpy(np.int64)
    b = inter["basket"].to_numpy(np.int64)
    item = inter["item_idx"].to_numpy(np.int64)
    pos = inter["pos"].to_numpy(np.int64)
    split = inter["split"].to_numpy(dtype=object)
    ts = inter["timestamp"].to_numpy("datetime64[ns]")
    n = len(inter)
    change = np.ones(n, dtype=bool)
    if n:
        change[1:] = (u[1:] != u[:-1]) | (b[1:] != b[:-1])
    gid = np.cumsum(change) - 1
    start = np.flatnonzero(change)
    end = np.append(start[1:], n)
    if len(start) != len(pd.MultiIndex.from_arrays([u, b]).unique()):
        raise AssertionError("a basket's rows are not contiguous in data.interactions")
    bts = np.minimum.reduceat(ts, start) if n else ts[:0]
    bsplit = split[start].copy()
    mixed = np.zeros(len(start), dtype=bool)
    np.logical_or.at(mixed, gid, split != split[start][gid])
    bsplit[mixed] = "mixed"
    bhol = res.holiday_index(pd.DatetimeIndex(bts))
    bseason = res.month_season[pd.DatetimeIndex(bts).month.to_numpy()] if n else bhol
    is_train = split == "train"
    n_train = np.bincount(u[is_train], minlength=data.n_users)
    # The training rows of every user must be a prefix of the sequence (temporal and
    # leave-one-out splits both guarantee it); the leakage checks below rely on it.
    if not np.array_equal(is_train, pos < n_train[u]):
        raise AssertionError("training interactions are not a prefix of each user's sequence")

    lv = res.discover_level
    code = res.level_codes[lv, item] if res.depth else np.full(n, -1)
    key = u * (int(code.max(initial=0)) + 2) + (code + 1)
    first = pd.Series(gid).groupby(key).transform("min").to_numpy()
    rows = RowView(item=item, user=u, split=split, hist_len=pos[start][gid],
                   season=bseason[gid], holiday=bhol[gid], first_in_category=gid == first)
    return Baskets(rows=rows, gid=gid, start=start, end=end, hist_len=pos[start], timestamp=bts,
                   split=bsplit, user=u[start], holiday=bhol, season=bseason, n_train=n_train)


def _cut(data: ProcessedData, res: TaskResources, bk: Baskets, g: int) -> Cut:
    u = int(bk.user[g])
    h = int(bk.holiday[g])
    split = str(bk.split[g])
    holiday = None
    if h >= 0:
        name = res.holidays[h].name
        holiday = name if res.holiday_split.get(name) == split else None
    s = int(bk.season[g])
    return Cut(user_idx=u, hist_len=int(bk.hist_len[g]), timestamp=pd.Timestamp(bk.timestamp[g]),
               split=split, history=data.sequence(u)[: int(bk.hist_len[g])],
               season=res.season_names[s] if s >= 0 else None, holiday=holiday)


def allocate(cfg: TasksConfig, names: Sequence[str]) -> dict[str, int]:
    """Training samples per task: fixed counts first, the rest of ``total_samples`` by weight
    (largest remainder; a task missing from ``weights`` weighs 1)."""
    fixed = {n: int(cfg.samples_per_task[n]) for n in names if n in cfg.samples_per_task}
    rest = [n for n in names if n not in fixed]
    remaining = max(cfg.total_samples - sum(fixed.values()), 0)
    w = np.array([float(cfg.weights.get(n, 1.0)) for n in rest])
    out = dict(fixed)
    if rest and w.sum() > 0:
        share = remaining * w / w.sum()
        base = np.floor(share).astype(int)
        order = np.argsort(-(share - base), kind="stable")
        base[order[: remaining - int(base.sum())]] += 1
        out.update({n: int(k) for n, k in zip(rest, base, strict=True)})
    else:
        out.update({n: 0 for n in rest})
    return {n: out[n] for n in names}


def _rng(seed: int, *keys: str) -> np.random.Generator:
    return np.random.default_rng([seed, *(sum(ord(c) * 31**i for i, c in enumerate(k)) % 2**31
                                          for k in keys)])


def eval_holiday_words(res: TaskResources) -> list[str]:
    """Names (display and aliases) of the holidays of the validation and test periods."""
    out = []
    for h in res.holidays:
        if res.holiday_split.get(h.name) in ("valid", "test"):
            out += [h.name.replace("_", " "), h.display.lower().removeprefix("the "),
                    *(a.lower() for a in h.aliases)]
    return sorted({w for w in out if w})


def mentions(text: str, words: Sequence[str]) -> bool:
    t = str(text).lower()
    return any(re.search(rf"(?<![a-z0-9]){re.escape(w)}(?![a-z0-9])", t) for w in words)


def _names_eval_holiday(task: Task, res: TaskResources) -> np.ndarray:
    """Items whose instruction text for ``task`` would name an evaluation holiday (a product type
    such as "CHRISTMAS LIGHTS"): kept out of training so no training instruction names one."""
    words = eval_holiday_words(res)
    out = np.zeros(res.n_items, dtype=bool)
    if not words or task.name not in ("Query", "Category"):
        return out
    if task.name == "Query":
        texts = res.item_query.tolist()
    else:
        codes = res.level_codes[res.category_level]
        names = [display_category(n) for n in res.level_names[res.category_level]]
        texts = [names[c] if c >= 0 else "" for c in codes.tolist()]
    cache: dict[str, bool] = {}
    for i, t in enumerate(texts):
        if t not in cache:
            cache[t] = mentions(t, words)
        out[i] = cache[t]
    return out


def _train_samples(task: Task, data: ProcessedData, res: TaskResources, bk: Baskets,
                   cfg: TasksConfig, n: int, seed: int) -> tuple[list[dict[str, Any]],
                                                                  dict[str, Any]]:
    rows = bk.rows
    listers = history_listers(res, cfg)
    ok = ((rows.split == "train") & (bk.split[bk.gid] == "train")
          & (rows.hist_len >= cfg.min_history) & task.admit(rows)
          & ~_names_eval_holiday(task, res)[rows.item])
    pool = np.flatnonzero(ok)
    info = {"pool_rows": int(len(pool)), "pool_cuts": int(len(np.unique(bk.gid[pool])))}
    if len(pool) < cfg.min_task_samples:
        return [], {**info, "skipped": f"only {len(pool)} training candidates "
                                        f"(min_task_samples = {cfg.min_task_samples})"}
    rng = _rng(seed, "train", task.name)
    take = pool if n >= len(pool) else np.sort(rng.choice(pool, size=n, replace=False))
    if n > len(pool):
        log.info("task %s: %d training samples asked, %d candidates exist", task.name, n,
                 len(pool))
    out = []
    for r in take:
        g = int(bk.gid[r])
        cut = _cut(data, res, bk, g)
        params, targets = task.targets(rows.item[bk.start[g]:bk.end[g]], cut, int(rows.item[r]))
        # Leakage guard: history and basket lie inside the user's training prefix.
        if cut.hist_len + (bk.end[g] - bk.start[g]) > bk.n_train[cut.user_idx] or (
            res.valid_start is not None and cut.timestamp >= res.valid_start
        ):
            raise AssertionError(f"{task.name}: training sample of user {cut.user_idx} at "
                                 f"position {cut.hist_len} reaches past the training period")
        out.append({
            "split": "train", "task": task.name, "user_idx": cut.user_idx,
            "hist_len": cut.hist_len, **prompt_columns(cut.history, cfg, listers),
            "target": int(rows.item[r]), "targets": targets, "timestamp": cut.timestamp,
            "instruction": task.instruction(params, held_out=False, rng=rng),
            "params": json.dumps(params, sort_keys=True), "profile": res.profiles[cut.user_idx],
            "_repeat": bool(np.isin(rows.item[r], cut.history)),
        })
    return out, info


ALIGN_ITEM_TEMPLATES = (
    'Find the product "{text}".',
    "Recommend this exact product: {text}.",
    'Which item matches "{text}"?',
)


def _align_samples(tasks: Mapping[str, Task], data: ProcessedData, res: TaskResources,
                   cfg: TasksConfig, seed: int) -> list[dict[str, Any]]:
    """Catalogue-only samples (no household): an instruction naming a query phrase, a category
    or one item's text, whose positives are the items it names (the most popular
    ``align_max_positives``) and whose target is one of them drawn by training popularity.
    Phrases that name an evaluation holiday are left out, like the tasks' own samples."""
    rng = _rng(seed, "train", "Align")
    counts = data.train_item_counts.astype(np.float64)
    kinds = [k for k in ("Query", "Category") if k in tasks] + ["Item"]
    per = allocate(cfg.model_copy(update={"samples_per_task": {}, "total_samples":
                                          cfg.align_samples, "weights": {}}), kinds)
    out: list[dict[str, Any]] = []
    base = {"split": "train", "task": "Align", "user_idx": -1, "hist_len": 0,
            **prompt_columns(np.zeros(0, dtype=np.int64), cfg, {}),  # no channel lists
            "timestamp": pd.Timestamp(0), "profile": "unknown", "_repeat": False}
    holiday_words = eval_holiday_words(res)
    for kind in kinds:
        if kind == "Item":
            col = "text" if "text" in data.items.columns else "title"
            vals = data.items[col].fillna("").astype(str).str.lower().to_numpy()
            ok = vals != ""
        else:
            ok = res.eligible & ~_names_eval_holiday(tasks[kind], res)
            vals = res.item_query if kind == "Query" else res.level_codes[res.category_level]
            ok &= (vals != "") if kind == "Query" else (vals >= 0)
        idx = np.flatnonzero(ok)
        groups = {k: idx[v] for k, v in pd.Series(idx).groupby(vals[idx]).indices.items()}
        keys = list(groups)
        if kind == "Item":
            keys = [k for k in keys if not mentions(k, holiday_words)]
        if not keys:
            continue
        # Phrases drawn by how often their items sell: the common ones matter most.
        weight = np.array([counts[groups[k]].sum() + 1.0 for k in keys])
        picks = rng.choice(len(keys), size=per[kind], p=weight / weight.sum())
        for j in picks:
            members = groups[keys[j]]
            w = counts[members] + 1.0
            target = int(rng.choice(members, p=w / w.sum()))
            positives = members[np.argsort(-w, kind="stable")[: cfg.align_max_positives]]
            if target not in positives:
                positives = np.append(positives[:-1], target)
            if kind == "Query":
                params: dict[str, Any] = {"query": str(keys[j])}
                text = tasks[kind].instruction(params, held_out=False, rng=rng)
            elif kind == "Category":
                params = {"category": res.level_names[res.category_level][int(keys[j])],
                          "level": res.category_level}
                text = tasks[kind].instruction(params, held_out=False, rng=rng)
            else:
                params = {"item_text": str(keys[j])}
                tpl = ALIGN_ITEM_TEMPLATES[int(rng.integers(len(ALIGN_ITEM_TEMPLATES)))]
                text = tpl.format(text=str(keys[j]))
            out.append({**base, "target": target, "targets": np.sort(positives).astype(np.int64),
                        "instruction": text, "params": json.dumps({"align": kind, **params},
                                                                  sort_keys=True)})
    return out


def _eval_instances(task: Task, data: ProcessedData, res: TaskResources, bk: Baskets,
                    cfg: TasksConfig, split: str, seed: int) -> list[dict[str, Any]]:
    rows = bk.rows
    listers = history_listers(res, cfg)
    admitted = np.zeros(len(bk.start), dtype=bool)
    ok = task.admit(rows) & (rows.split == split)
    np.logical_or.at(admitted, bk.gid[ok], True)
    in_window = (bk.split == split) & (bk.hist_len > 0)
    if task.name == "Holiday":
        hol_ok = np.array([res.holiday_split.get(h.name) == split for h in res.holidays] + [False])
        in_window &= hol_ok[bk.holiday]
        group = bk.user * (len(res.holidays) + 1) + bk.holiday
    else:
        group = bk.user
    cand = np.flatnonzero(in_window & admitted) if cfg.eval_basket == "first_with_target" \
        else np.flatnonzero(in_window)
    if not len(cand):
        return []
    # Baskets are in (user, time) order, so the first basket of a group is its smallest id.
    _, first_idx = np.unique(group[cand], return_index=True)
    chosen = [int(g) for g in cand[first_idx] if admitted[g]]
    rng = _rng(seed, split, task.name)
    out = []
    for g in chosen:
        items = rows.item[bk.start[g]:bk.end[g]]
        mask = ok[bk.start[g]:bk.end[g]]
        anchor = int(rng.choice(items[mask]))
        cut = _cut(data, res, bk, g)
        params, targets = task.targets(items, cut, anchor)
        out.append({
            "split": split, "task": task.name, "user_idx": cut.user_idx,
            "hist_len": cut.hist_len, "targets": targets, "timestamp": cut.timestamp,
            "instruction": task.instruction(params, held_out=True, rng=rng),
            "params": json.dumps(params, sort_keys=True), "profile": res.profiles[cut.user_idx],
            **prompt_columns(cut.history, cfg, listers),
        })
    return out


def _jfy_instances(task: Task, data: ProcessedData, res: TaskResources, cfg: TasksConfig,
                   split: str, seed: int) -> list[dict[str, Any]]:
    rng = _rng(seed, split, task.name)
    listers = history_listers(res, cfg)
    out = []
    for r in data.eval_instances(split).to_dict("records"):
        u, h = int(r["user_idx"]), int(r["hist_len"])
        full = data.history(u, h)
        out.append({
            "instance_id": int(r["instance_id"]), "split": split, "task": task.name,
            "user_idx": u, "hist_len": h, "targets": np.asarray(r["targets"], dtype=np.int64),
            "timestamp": pd.Timestamp(r["timestamp"]),
            "instruction": task.instruction({}, held_out=True, rng=rng), "params": "{}",
            "profile": res.profiles[u], **prompt_columns(full, cfg, listers),
        })
    return out


def _cap(rows: list[dict[str, Any]], cap: int | None, seed: int, *keys: str) -> list[dict]:
    if cap is None or len(rows) <= cap:
        return rows
    keep = np.sort(_rng(seed, "cap", *keys).choice(len(rows), size=cap, replace=False))
    return [rows[i] for i in keep]


def _param_counts(params: pd.Series, key: str, top: int = 12) -> dict[str, int]:
    c = Counter(json.loads(p).get(key) for p in params)
    return {str(k): int(v) for k, v in c.most_common(top)}


def _task_stats(df: pd.DataFrame, data: ProcessedData, train: bool) -> dict[str, Any]:
    if df.empty:
        return {"n": 0}
    tl = df["targets"].map(len).to_numpy()
    out: dict[str, Any] = {
        "n": int(len(df)),
        "users": int(df["user_idx"].nunique()),
        "targets_per_instance": round(float(tl.mean()), 3),
    }
    if train:
        out["distinct_targets"] = int(df["target"].nunique())
        out["repeat_share"] = round(float(df["_repeat"].mean()), 4)
    else:
        out["distinct_targets"] = int(len(np.unique(np.concatenate(df["targets"].to_list()))))
        hits = total = 0
        for u, h, t in zip(df["user_idx"], df["hist_len"], df["targets"], strict=True):
            hits += int(np.isin(t, data.history(int(u), int(h))).sum())
            total += len(t)
        out["repeat_share"] = round(hits / max(total, 1), 4)
    task = df["task"].iloc[0]
    key = {"Query": "query", "Category": "category", "Season": "season",
           "Holiday": "holiday"}.get(task)
    if key:
        out["distinct_params"] = int(df["params"].map(lambda p: json.loads(p).get(key)).nunique())
        out["top_params"] = _param_counts(df["params"], key)
    return out


def build_sft_data(data: ProcessedData, cfg: TasksConfig, seed: int = 0) -> SFTData:
    """Training samples, evaluation instances and statistics for the enabled tasks."""
    t0 = time.perf_counter()
    seed = cfg.seed if cfg.seed is not None else seed
    res = build_resources(data, cfg)
    tasks, skipped = supported(build_tasks(res, list(cfg.enabled)))
    bk = build_baskets(data, res)
    t_res = time.perf_counter() - t0

    want = allocate(cfg, list(tasks))
    train_rows: list[dict[str, Any]] = []
    pools: dict[str, dict[str, Any]] = {}
    for name, task in list(tasks.items()):
        rows, info = _train_samples(task, data, res, bk, cfg, want[name], seed)
        pools[name] = {**info, "asked": want[name]}
        if "skipped" in info:
            skipped[name] = info["skipped"]
            log.info("task %s skipped: %s", name, info["skipped"])
            del tasks[name]
            continue
        train_rows.extend(rows)
    if cfg.align_samples:
        align = _align_samples(tasks, data, res, cfg, seed)
        pools["Align"] = {"asked": cfg.align_samples, "made": len(align)}
        train_rows.extend(align)
    t_train = time.perf_counter() - t0 - t_res
    words = eval_holiday_words(res)
    for r in train_rows:
        if mentions(r["instruction"], words) or json.loads(r["params"]).get("holiday") in {
            h for h, s in res.holiday_split.items() if s in ("valid", "test")
        }:
            raise AssertionError(f"training instruction names an evaluation holiday: {r}")

    evals: dict[str, list[dict[str, Any]]] = {"valid": [], "test": []}
    next_id = int(data.instances["instance_id"].max()) + 1 if len(data.instances) else 0
    for split in ("valid", "test"):
        for name, task in tasks.items():
            if name == "JustForYou":
                rows = _jfy_instances(task, data, res, cfg, split, seed)
            else:
                rows = _eval_instances(task, data, res, bk, cfg, split, seed)
            rows = _cap(rows, cfg.eval_cap(name, split), seed, split, name)
            for r in rows:
                if "instance_id" not in r:
                    r["instance_id"] = next_id
                    next_id += 1
            evals[split].extend(rows)
    t_eval = time.perf_counter() - t0 - t_res - t_train

    train = pd.DataFrame(train_rows, columns=[*train_columns()[1:], "_repeat"])
    train.insert(0, "sample_id", np.arange(len(train), dtype=np.int64))
    frames = {s: pd.DataFrame(evals[s], columns=eval_columns()) for s in ("valid", "test")}
    for s, df in frames.items():
        frames[s] = df.astype({"instance_id": np.int64, "user_idx": np.int64,
                               "hist_len": np.int64}).reset_index(drop=True)

    order = [n for n in TASK_NAMES if n in tasks]
    stats: dict[str, Any] = {"tasks": {}, "skipped": skipped}
    for name in order:
        stats["tasks"][name] = {
            "train": {**_task_stats(train[train["task"] == name], data, True), **pools[name]},
            **{s: _task_stats(frames[s][frames[s]["task"] == name], data, False)
               for s in ("valid", "test")},
        }
    stats["totals"] = {"train": int(len(train)), "valid": int(len(frames["valid"])),
                       "test": int(len(frames["test"]))}
    stats["resources"] = {
        "longtail_threshold": res.longtail_threshold,
        "longtail_items": int(res.longtail.sum()),
        "season_items": {s: int(res.season_items[i].sum())
                         for i, s in enumerate(res.season_names)},
        "holiday_split": res.holiday_split,
        "holiday_items": {k: int(v.sum()) for k, v in res.holiday_items.items()},
        "category_level": res.category_level,
        "discover_level": res.discover_level,
    }
    stats["seconds"] = {"resources": round(t_res, 2), "train": round(t_train, 2),
                        "eval": round(t_eval, 2)}
    train = train.drop(columns=["_repeat"])
    return SFTData(train=train, valid=frames["valid"], test=frames["test"], stats=stats,
                   skipped=skipped, resources=res, tasks=tasks)


# The prompt, the history summaries and the channel columns used to live here.
__all__ = ["SYSTEM_PROMPT", "Baskets", "RenderedPrompt", "SFTData", "allocate", "build_baskets",
           "build_sft_data", "decode_sample", "eval_holiday_words", "item_description",
           "mentions", "most_bought", "novelty_lister", "prefix_tokens", "prompt_columns",
           "purchase_counts", "render_prompt"]
