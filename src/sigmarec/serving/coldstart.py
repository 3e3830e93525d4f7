"""Cold-start evaluation: items no stage trained on, onboarded with ``items add``, then served.

The run must hold items out (``data.holdout_new_items_weeks``): the items first sold in the last
weeks of the data are cut out of the catalogue and of every interaction before anything is
fitted (:mod:`sigmarec.data.build`), and their purchases are kept apart in ``data/holdout/``.
:func:`run_coldstart` onboards them exactly as ``sigma items add`` does, then ranks the test
window with every model, over the whole catalogue (trained items plus the new ones):

* **feed** instances: the data stage's test instances (each user's first test basket; history =
  everything before it), targets = the basket's trained items plus the new items bought in the
  same basket. They give HR@10 over all targets and how often new items are shown: their share
  of the top-10 slots and the share of users with at least one in their top 10.
* **new-item** instances: every test-window purchase occasion (a basket, or for purchases whose
  basket held no trained item, a timestamp) that included a new item; history = the user's
  trained-catalogue purchases before it. HR@10 counts a hit only for a new item of the basket.

Models: SIGMA (the new items get soft tokens through the trained ProjFuse and join the prefix
index), SIGMA restricted to the trained catalogue (the same prompt forwards, to see what the
new items cost the old ones), the classical baselines (they have no score for an item they were
not fitted on: new items rank last), and SASRec with the ID-tower stand-in vectors as the new
items' embeddings (the stand-in alone, without ProjFuse or the LLM). GR(ID) has one output token
per trained item and cannot emit a new item at all; it is reported as such.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from sigmarec.baselines.registry import restore
from sigmarec.config import SigmaConfig
from sigmarec.data.processed import Holdout, ProcessedData, load_holdout
from sigmarec.errors import SigmaError, StageError
from sigmarec.serving.catalog import CatalogOverlay, load_overlay, stage_run_ids
from sigmarec.serving.fusion_choice import generation_choice
from sigmarec.serving.items import ItemSpace, add_frame, stand_in_fidelity
from sigmarec.serving.overlay import add_to_loaded, extend_items

log = logging.getLogger("sigmarec")

TOP = 10


def derive_holdout(data: ProcessedData, run_cfg: SigmaConfig, weeks: int, source: str
                   ) -> Holdout:
    """The holdout of a run trained without ``data.holdout_new_items_weeks``, when that run's
    catalogue cannot hold the items anyway: with a temporal split the catalogue counts
    training-period purchases only, so items first sold after ``valid_start`` never entered
    any stage. The data stage is rebuilt with the option and must give the same catalogue,
    interactions and instances (checked), so nothing the run trained on changes."""
    from sigmarec.data.build import build
    from sigmarec.data.sources import load_source

    dcfg = run_cfg.data.model_copy(update={"holdout_new_items_weeks": weeks})
    again = build(load_source(dcfg), dcfg, run_cfg.seed)
    cutoff = pd.Timestamp(again.info["holdout"]["first_sold_from"])
    same = (again.items["item_id"].astype(str).tolist() == data.items["item_id"].astype(str)
            .tolist()
            and again.interactions[["user_idx", "item_idx", "basket", "split"]].equals(
                data.interactions[["user_idx", "item_idx", "basket", "split"]])
            and len(again.instances) == len(data.instances))
    if not same or again.holdout is None:
        raise SigmaError(f"{source}: this run's data differ once items first sold from "
                         f"{cutoff.date()} are held out, so some stage trained on them; rerun it "
                         f"with --set data.holdout_new_items_weeks={weeks} (a separate --out)")
    log.info("coldstart: %s was trained without the holdout option; its data stage is "
             "identical with it (items first sold from %s never entered the catalogue)",
             source, cutoff.date())
    data.info["holdout"] = {**again.info["holdout"], "derived": True}
    return again.holdout


def _prepare(run_dir: Path, cfg: SigmaConfig) -> tuple[ProcessedData, Holdout, ItemSpace,
                                                       CatalogOverlay, float]:
    data = ProcessedData.load(run_dir / "data")
    if data.info.get("split") != "temporal":
        raise SigmaError(f"{run_dir}: cold-start evaluation needs a temporal split (test window)")
    space = ItemSpace(run_dir)
    holdout = load_holdout(run_dir / "data")
    if holdout is None and cfg.data.holdout_new_items_weeks is not None:
        holdout = derive_holdout(data, space.cfg, cfg.data.holdout_new_items_weeks,
                                 str(run_dir))
    if holdout is None or holdout.items.empty:
        raise SigmaError(f"{run_dir}: the run held no new items out; run it with "
                         "--set data.holdout_new_items_weeks=4 (a separate --out: it changes "
                         "the data stage)")
    overlay = load_overlay(run_dir, check=False)
    have = set() if overlay is None else set(overlay.items["item_id"].astype(str))
    stale = overlay is not None and overlay.meta.get("stage_run_ids") != stage_run_ids(run_dir)
    todo = holdout.items[~holdout.items["item_id"].astype(str).isin(have)]
    seconds = 0.0
    if len(todo) or stale:
        t0 = time.perf_counter()
        cols = ["item_id", "title", "category_path", "brand", "attributes"]
        overlay = add_frame(run_dir, space, todo[cols].reset_index(drop=True),
                            str(run_dir / "data" / "holdout" / "items.parquet"), cfg.serving.items)
        seconds = time.perf_counter() - t0
    overlay = load_overlay(run_dir)  # checked against the run this time
    assert overlay is not None
    return data, holdout, space, overlay, seconds


def build_instances(data: ProcessedData, holdout: Holdout, new_idx: dict[str, int]
                    ) -> pd.DataFrame:
    """Feed and new-item instances (see the module docstring), one row per (user, hist_len):
    user_idx, hist_len, targets_old, targets_new, feed (bool), new_occasion (bool)."""
    held = holdout.interactions[holdout.interactions["split"] == "test"].copy()
    held["item_idx"] = held["item_id"].astype(str).map(new_idx)
    held = held[held["item_idx"].notna()]
    rows: dict[tuple[int, int], dict[str, Any]] = {}

    def row(u: int, h: int) -> dict[str, Any]:
        return rows.setdefault((u, h), {"user_idx": u, "hist_len": h, "targets_old": set(),
                                        "targets_new": set(), "feed": False,
                                        "new_occasion": False})

    inter = data.interactions  # sorted by (user_idx, pos)
    ts = inter["timestamp"].to_numpy()
    user_col = inter["user_idx"].to_numpy()
    first_pos = inter.groupby(["user_idx", "basket"])["pos"].min()
    for inst in data.eval_instances("test").itertuples(index=False):
        u, h = int(inst.user_idx), int(inst.hist_len)
        r = row(u, h)
        r["feed"] = True
        r["targets_old"].update(int(t) for t in inst.targets)
        basket = int(data.baskets(u)[h])
        same = held[(held["user_idx"] == u) & (held["basket"] == basket)]
        r["targets_new"].update(int(t) for t in same["item_idx"])
    held["key"] = np.where(held["basket"] >= 0, held["basket"].astype(str),
                           "t" + held["timestamp"].astype(str))
    for (u, _), grp in held.groupby(["user_idx", "key"], sort=True):
        u = int(u)
        b = int(grp["basket"].iloc[0])
        if b >= 0:
            h = int(first_pos.loc[(u, b)])
        else:
            lo, hi = np.searchsorted(user_col, [u, u + 1])
            user_ts = ts[lo:hi]
            h = int(np.searchsorted(user_ts, grp["timestamp"].min().to_datetime64(), "left"))
        if h == 0:
            continue  # nothing to condition on
        r = row(u, h)
        r["new_occasion"] = True
        r["targets_new"].update(int(t) for t in grp["item_idx"])
        if b >= 0:
            seq, baskets = data.sequence(u), data.baskets(u)
            r["targets_old"].update(int(t) for t in seq[baskets == b])
    out = pd.DataFrame(list(rows.values()))
    for c in ("targets_old", "targets_new"):
        out[c] = out[c].map(lambda s: np.array(sorted(s), dtype=np.int64))
    return out.sort_values(["user_idx", "hist_len"]).reset_index(drop=True)


def _prompts(data: ProcessedData, inst: pd.DataFrame, cfg: SigmaConfig, seed: int
             ) -> pd.DataFrame:
    """JustForYou prompt rows for the instances, as the tasks stage writes its instances."""
    from sigmarec.tasks.columns import history_listers, prompt_columns
    from sigmarec.tasks.registry import build_tasks
    from sigmarec.tasks.resources import build_resources

    res = build_resources(data, cfg.tasks)
    task = build_tasks(res, ["JustForYou"])["JustForYou"]
    rng = np.random.default_rng(seed)
    t = cfg.tasks
    listers = history_listers(res, t)
    rows = []
    for r in inst.itertuples(index=False):
        full = data.history(int(r.user_idx), int(r.hist_len))
        rows.append({"user_idx": int(r.user_idx), "hist_len": int(r.hist_len),
                     "targets": np.concatenate([r.targets_old, r.targets_new]),
                     "instruction": task.instruction({}, held_out=True, rng=rng), "params": "{}",
                     "task": "JustForYou",
                     "profile": res.profiles[int(r.user_idx)],
                     **prompt_columns(full, t, listers)})
    return pd.DataFrame(rows)


def _sigma_lists(run_dir: Path, cfg: SigmaConfig, data: ProcessedData, overlay: CatalogOverlay,
                 prompts: pd.DataFrame, batch_size: int, n: int
                 ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    from sigmarec.generation.fusion import fuse
    from sigmarec.generation.run_model import load_run_model
    from sigmarec.generation.stage import decode_split
    from sigmarec.tasks.text_match import data_matcher
    from sigmarec.training.stage import to_examples

    choice = generation_choice(run_dir, cfg)
    tau, k, how = choice.tau, choice.k_prefixes, choice.source
    run = load_run_model(run_dir, k, cfg.generation.m_per_prefix)
    model, decoder = run.model, run.decoder
    n_base = model.n_items
    t0 = time.perf_counter()
    add_to_loaded(overlay, model, decoder)
    apply_s = time.perf_counter() - t0
    matcher = data_matcher(model.cfg, data, cfg.tasks, extend_items(data, overlay).items)
    examples = to_examples(prompts, model, run.vocab, model.item_prefix.cpu().numpy(),
                           with_target=False, matcher=matcher, style=run.prompt)
    # decode_split takes one mask row per example
    trained_only = np.broadcast_to(np.arange(model.n_items) < n_base,
                                   (len(examples), model.n_items))
    (full, old), seconds = decode_split(decoder, examples, n, batch_size, [None, trained_only],
                                        "sigma coldstart")
    a = choice.copy_scale
    mode = choice.mode
    lists = {"sigma": fuse(full, mode, tau, n, a)[0],
             "sigma (trained items only)": fuse(old, mode, tau, n, a)[0]}
    return lists, {"tau": tau, "k_prefixes": k, "copy_scale": a, "tau_k_from": how,
                   "decode_s": round(seconds, 1), "apply_overlay_s": round(apply_s, 3)}


def _baseline_lists(run_dir: Path, cfg: SigmaConfig, data: ProcessedData,
                    overlay: CatalogOverlay, inst: pd.DataFrame, n: int
                    ) -> dict[str, np.ndarray]:
    from sigmarec.baselines.sasrec.model import pad_histories
    from sigmarec.metrics.ranking import top_n

    n_total = overlay.n_base + overlay.n_items
    hist = [data.history(int(u), int(h)) for u, h in zip(inst["user_idx"], inst["hist_len"],
                                                         strict=True)]
    users = inst["user_idx"].to_numpy()
    out = {}
    for name in cfg.baselines.enabled:
        folder = run_dir / "baselines" / "models" / name
        if not folder.is_dir():
            continue
        model = restore(name, cfg, folder, data)
        variants = [(name, None)]
        sas = getattr(model, "model", None)
        if name == cfg.baselines.id_tower and sas is not None and overlay.id_vectors.shape[1]:
            variants.append((f"{name} + stand-in ID vectors",
                             torch.as_tensor(overlay.id_vectors, dtype=torch.float32)))
        for label, new_emb in variants:
            parts = []
            for s in range(0, len(inst), cfg.eval.batch_size):
                with torch.no_grad():
                    sc = model.score(users[s:s + cfg.eval.batch_size],
                                     hist[s:s + cfg.eval.batch_size]).float()
                    if new_emb is None:
                        # Not fitted on them: no score; they rank after every trained item.
                        extra = torch.full((sc.shape[0], n_total - sc.shape[1]), -torch.inf)
                    else:
                        sas.eval()
                        seq = pad_histories(hist[s:s + cfg.eval.batch_size], sas.max_len)
                        states = sas(seq.to(next(sas.parameters()).device))[:, -1].float().cpu()
                        extra = states @ new_emb.T
                sc = torch.cat([sc, extra], dim=1)
                parts.append(top_n(sc, n)[0])
            out[label] = np.concatenate(parts)
    return out


def _metrics(lists: np.ndarray, inst: pd.DataFrame, n_base: int) -> dict[str, Any]:
    top = lists[:, :TOP]
    is_new = top >= n_base
    feed, occ = inst["feed"].to_numpy(), inst["new_occasion"].to_numpy()
    hit_new = np.array([np.isin(t, tn).any() for t, tn in zip(top, inst["targets_new"],
                                                              strict=True)])
    hit_old = np.array([np.isin(t, to).any() for t, to in zip(top, inst["targets_old"],
                                                              strict=True)])

    def mean(x: np.ndarray) -> float | None:
        return round(float(x.mean()), 4) if len(x) else None

    def se(x: np.ndarray) -> float | None:
        return round(float(x.std(ddof=1) / np.sqrt(len(x))), 4) if len(x) > 1 else None

    shown = np.unique(top[is_new])
    return {
        "HR@10 new items (new-item occasions)": mean(hit_new[occ]),
        "HR@10 new items SE": se(hit_new[occ].astype(float)),
        "HR@10 all targets (feed)": mean((hit_new | hit_old)[feed]),
        "HR@10 trained-item targets (feed)": mean(hit_old[feed]),
        "new-item share of top-10 slots (feed)": mean(is_new[feed].mean(axis=1)),
        "users with a new item in top 10 (feed)": mean(is_new[feed].any(axis=1)),
        "distinct new items shown (all instances)": int(len(shown)),
    }


def run_coldstart(run_dir: Path, cfg: SigmaConfig, batch_size: int = 16,
                  max_instances: int | None = None) -> dict[str, Any]:
    """Onboard the held-out items and measure every model on them (see the module docstring)."""
    run_dir = Path(run_dir)
    if not (run_dir / "training" / "model").is_dir():
        raise StageError(f"{run_dir}: no trained model; run `sigma run --until training` with "
                         "data.holdout_new_items_weeks set first")
    data, holdout, space, overlay, onboard_s = _prepare(run_dir, cfg)
    run_cfg = space.cfg
    new_idx = {str(i): int(x) for i, x in zip(overlay.items["item_id"], overlay.items["item_idx"],
                                              strict=True)}
    inst = build_instances(data, holdout, new_idx)
    if max_instances is not None:
        rng = np.random.default_rng(run_cfg.seed)
        keep = np.zeros(len(inst), dtype=bool)
        for col in ("feed", "new_occasion"):
            idx = np.flatnonzero(inst[col].to_numpy())
            keep[rng.choice(idx, min(max_instances, len(idx)), replace=False)] = True
        inst = inst[keep].reset_index(drop=True)
    log.info("coldstart: %d new items onboarded (%.1fs); %d instances (%d feed, %d new-item "
             "occasions)", overlay.n_items, onboard_s, len(inst), int(inst["feed"].sum()),
             int(inst["new_occasion"].sum()))
    n = max(run_cfg.eval.top_n, TOP)
    prompts = _prompts(data, inst, run_cfg, run_cfg.seed)
    lists, sigma_info = _sigma_lists(run_dir, run_cfg, data, overlay, prompts, batch_size, n)
    lists.update(_baseline_lists(run_dir, run_cfg, extend_items(data, overlay), overlay, inst, n))
    held_test = int((holdout.interactions["split"] == "test").sum())
    test_total = int((data.interactions["split"] == "test").sum()) + held_test
    models = {name: _metrics(v, inst, overlay.n_base) for name, v in lists.items()}
    if not run_cfg.gr.enabled:
        models["gr_id"] = {"note": "not run (gr.enabled false); an item it was not trained on "
                           "has no output token, so its new-item HR@10 and exposure are 0 by "
                           "construction"}
    return {
        "run_dir": str(run_dir),
        "holdout": data.info.get("holdout", {}),
        "catalogue": {"trained_items": overlay.n_base, "new_items": overlay.n_items,
                      "catalogue_version": overlay.version,
                      "id_stand_in": overlay.meta.get("id_stand_in")},
        "new_item_share_of_test_purchases": round(held_test / max(test_total, 1), 4),
        "onboarding": {"seconds": round(onboard_s, 1),
                       "items_per_s": round(overlay.n_items / onboard_s, 1) if onboard_s else None},
        "instances": {"all": len(inst), "feed": int(inst["feed"].sum()),
                      "new_item_occasions": int(inst["new_occasion"].sum())},
        "sigma": sigma_info,
        "stand_in_fidelity": stand_in_fidelity(space, cfg.serving.items, seed=run_cfg.seed),
        "models": models,
    }


def coldstart_table(result: dict[str, Any]) -> Any:
    """A rich table of :func:`run_coldstart`'s models."""
    from rich.table import Table

    cols = ["HR@10 new items (new-item occasions)", "HR@10 all targets (feed)",
            "HR@10 trained-item targets (feed)", "new-item share of top-10 slots (feed)",
            "users with a new item in top 10 (feed)", "distinct new items shown (all instances)"]
    short = ["HR@10 new", "HR@10 all", "HR@10 trained", "new slots", "users w/ new", "new shown"]
    t = Table(title=f"cold start: {result['catalogue']['new_items']} new items, "
              f"{result['instances']['new_item_occasions']} new-item occasions, "
              f"{result['instances']['feed']} feed instances")
    t.add_column("model")
    for s in short:
        t.add_column(s, justify="right")
    for name, m in result["models"].items():
        if "note" in m:
            t.add_row(name, *["n/a"] * len(cols))
            continue
        t.add_row(name, *("" if m[c] is None else str(m[c]) for c in cols))
    return t


def as_markdown(result: dict[str, Any]) -> str:
    """The models table as Markdown (for BENCHMARKS.md)."""
    cols = ["HR@10 new items (new-item occasions)", "HR@10 new items SE",
            "HR@10 all targets (feed)", "HR@10 trained-item targets (feed)",
            "new-item share of top-10 slots (feed)", "users with a new item in top 10 (feed)",
            "distinct new items shown (all instances)"]
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, m in result["models"].items():
        if "note" in m:
            lines.append(f"| {name} | " + " | ".join(["—"] * len(cols)) + " |")
        else:
            lines.append(f"| {name} | " + " | ".join(str(m[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n\n" + json.dumps({k: v for k, v in result.items()
                                                   if k != "models"}, indent=1)
