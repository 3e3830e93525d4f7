"""``sigma bench nearline``: the nearline update of the same users with prompt KV reuse against
recomputing them from scratch, in one process, as ratios (BENCHMARKS.md section 11).

On a temporary copy of the run directory (the run itself is never written):

1. prime: compute every chosen user's current lists and store their prompt KV (what the
   previous nearline pass leaves behind);
2. append one new basket per user (two items the user bought before: grocery repurchase, the
   common case) as an events batch;
3. time the update of those users both ways, alternating, ``repeats`` times each, the KV
   store restored to its primed state before every reuse run: the whole recompute (prompts,
   steps 2-3, KV writes, as ``sigma nearline`` runs it) and the prompt forward (step 1) alone.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from sigmarec.config import SigmaConfig
from sigmarec.errors import SigmaError
from sigmarec.serving import kv_cache as kc
from sigmarec.serving.nearline import (
    Recomputer,
    _recompute,
    append_events,
    check_tasks,
    file_sha256,
    open_kv,
    read_new_events,
)
from sigmarec.serving.request import RecRequest
from sigmarec.serving.runtime import Runtime


def _copy_run(run_dir: Path, dest: Path) -> Path:
    if not (run_dir / "training" / "model").is_dir():
        raise SigmaError(f"{run_dir}: no trained model (training/model); train the run first")
    # The run's own serving state (KV entries, store) stays out; its events stay in.
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("kv", "u2i.sqlite*",
                                                                 "nearline.lock"))
    return dest


def _new_basket(rt: Runtime, users: list[int], path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    data = rt.data
    last = max(data.interactions["timestamp"].max(), pd.Timestamp("2000-01-01"))
    when = (last + pd.Timedelta(days=1)).isoformat()
    rows = []
    for u in users:
        hist = np.unique(rt.user_history(u))
        for item in rng.choice(hist, size=min(2, len(hist)), replace=False):
            rows.append({"user_id": str(data.users["user_id"].iat[u]),
                         "item_id": str(rt.item_ids[item]), "timestamp": when,
                         "basket_id": f"bench-{u}"})
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _prompt_times(rt: Runtime, kv: kc.KVCacheStore | None, pairs: list[tuple[int, str]],
                  batch_size: int, k: int) -> tuple[float, list[torch.Tensor]]:
    """Seconds of step 1 alone over ``pairs`` in batches (with KV lookups and loads when
    ``kv`` is given), and the level-1 log-probs it produced."""
    decoder = rt.decoder
    model = decoder.model
    users = rt.data.users["user_id"]
    seconds, out = 0.0, []
    for s in range(0, len(pairs), batch_size):
        part = pairs[s:s + batch_size]
        ex = rt.prompt_examples([RecRequest(user_id=str(users.iat[u]), task=t, k=k)
                                 for u, t in part])
        batch = decoder.batch(ex)
        t0 = time.perf_counter()
        cached = ([kv.best(u, kc.token_keys(e, model.item_token_id))
                   for (u, _), e in zip(part, ex, strict=True)] if kv is not None else None)
        with torch.no_grad():
            if kv is None:
                _, cache = kc._from_scratch(model, batch)  # the decoder's own step 1
            else:
                cache, _, _ = kc.prompt_forward(model, batch, ex, cached)
        seconds += time.perf_counter() - t0
        out.append(cache.logprobs.float().cpu())
    return seconds, out


def bench_nearline(run_dir: Path, cfg: SigmaConfig, n_users: int, repeats: int
                   ) -> dict[str, Any]:
    from sigmarec.core.seed import set_threads

    ncfg = cfg.serving.nearline
    set_threads(cfg.threads)
    with tempfile.TemporaryDirectory(prefix="sigma-bench-nearline-") as tmp:
        work = _copy_run(Path(run_dir), Path(tmp) / "run")
        rt = Runtime.load(work, cfg)
        tasks = check_tasks(rt, ncfg.tasks, "sigma")
        # Users with the longest histories first (the prompts nearline serves most often are
        # of active users), deterministic.
        lengths = np.array([len(rt.user_history(u)) for u in range(rt.data.n_users)])
        users = [int(u) for u in np.argsort(-lengths, kind="stable")[:n_users]]
        pairs = [(u, t) for t in tasks for u in users]
        kv = open_kv(work, cfg)
        _recompute(Recomputer(rt, ncfg.k, kv=kv), np.array(users), tasks, ncfg.batch_size,
                   kc.ReuseStats())
        primed = Path(tmp) / "kv_primed"
        shutil.copytree(kc.kv_dir(work), primed)
        f = _new_basket(rt, users, Path(tmp) / "events.csv")
        append_events(work, read_new_events(f, cfg, rt), file_sha256(f), f)
        rt.reload()

        def restore() -> kc.KVCacheStore:
            shutil.rmtree(kc.kv_dir(work))
            shutil.copytree(primed, kc.kv_dir(work))
            return open_kv(work, cfg)

        times: dict[str, list[float]] = {"from scratch": [], "KV reuse": []}
        prompt: dict[str, list[float]] = {"from scratch": [], "KV reuse": []}
        lists: dict[str, list] = {}
        stats = kc.ReuseStats()
        for rep in range(repeats):
            for name in ("from scratch", "KV reuse") if rep % 2 == 0 else ("KV reuse",
                                                                           "from scratch"):
                store = restore() if name == "KV reuse" else None
                st = kc.ReuseStats()
                # Without a store: the no-reuse path of nearline, the runtime's decoder call.
                rec = Recomputer(rt, ncfg.k, kv=store)
                t0 = time.perf_counter()
                rows = _recompute(rec, np.array(users), tasks, ncfg.batch_size, st)
                times[name].append(time.perf_counter() - t0)
                lists[name] = [r.items for r in rows]
                if name == "KV reuse" and rep == 0:
                    stats = st
                store = restore() if name == "KV reuse" else None
                secs, lp = _prompt_times(rt, store, pairs, ncfg.batch_size, ncfg.k)
                prompt[name].append(secs)
                lists[f"{name} logp"] = lp
        diff = max(float((a - b).abs().max()) for a, b in zip(
            lists["from scratch logp"], lists["KV reuse logp"], strict=True))
        same = float(np.mean([a == b for a, b in zip(lists["from scratch"], lists["KV reuse"],
                                                     strict=True)]))
        med = {n: statistics.median(v) for n, v in times.items()}
        pmed = {n: statistics.median(v) for n, v in prompt.items()}
        methods = {n: {"update_s": med[n], "prompt_s": pmed[n],
                       "update_runs_s": [round(x, 3) for x in times[n]],
                       "prompt_runs_s": [round(x, 3) for x in prompt[n]],
                       "tokens_run": stats.tokens if n == "from scratch" else stats.computed,
                       "speedup_update": med["from scratch"] / med[n],
                       "speedup_prompt": pmed["from scratch"] / pmed[n]}
                   for n in times}
        out = {"run": str(run_dir), "backbone": cfg.backbone.model_dump(mode="json"),
               "users": len(users), "tasks": tasks, "batch_size": ncfg.batch_size,
               "k": ncfg.k, "repeats": repeats, "threads": torch.get_num_threads(),
               "methods": methods, "reuse": stats.as_dict(),
               "kv_bytes_per_prompt": int(open_kv(work, cfg).nbytes / max(len(pairs), 1)),
               "max_logprob_diff": diff, "same_lists": same}
    return out
