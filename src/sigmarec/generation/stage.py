"""The generation stage: ranked lists for every task's evaluation instances.

* SIGMA: the three-step decoder over the trained model. Steps 1-2 run once per instance; each
  fusion mode (``generation.variants``) and each tau of ``tau_grid`` is then only a re-sort of
  the same candidates, so the APF ablation and the accuracy/diversity curve cost seconds. tau is
  chosen per mode on validation HR@10 (averaged over tasks); with ``fusion_per_task``, adaptive
  fusion then gets a (tau, copy scale) per task on that task's validation HR@10 (``sigma``;
  the single choice stays as ``sigma_global``); test is only reported.
* The classical baselines, re-ranked on the same task instances (they ignore the instruction),
  and with each instance's checkable rule as a filter ("<name>+rule": admitted items first,
  then the rest, so lists stay full).

Artifacts: ``rankings/{model}_{split}.parquet`` (instance_id, items, scores), ``tau_curve.csv``,
``prefix_usage.json``, ``examples.json``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from sigmarec.baselines.registry import restore
from sigmarec.core.atomic import atomic_path, write_json, write_parquet
from sigmarec.core.stage import Stage, StageContext
from sigmarec.data.processed import ProcessedData
from sigmarec.errors import StageError
from sigmarec.generation.decode import SigmaDecoder
from sigmarec.generation.fusion import (
    Candidates,
    fuse,
    fuse_by_group,
    prefix_spread,
    truncate,
    tuned_mode,
)
from sigmarec.generation.run_model import load_run_model
from sigmarec.metrics import accuracy_metrics, beyond_metrics, category_codes, head_mask
from sigmarec.metrics.ranking import top_n
from sigmarec.tasks.rules import instance_allow_masks, load_tasks
from sigmarec.tasks.text_match import data_matcher
from sigmarec.training.stage import to_examples

log = logging.getLogger("sigmarec")

SPLITS = ("valid", "test")


def concat_candidates(parts: list[Candidates]) -> Candidates:
    """Batches may have been given different K (filters widen the beam): pad to the largest."""
    k = max(p.items.shape[1] for p in parts)
    m = max(p.items.shape[2] for p in parts)

    def pad(x: np.ndarray, value: float, dims: int) -> np.ndarray:
        widths = [(0, 0), (0, k - x.shape[1])] + ([(0, m - x.shape[2])] if dims == 3 else [])
        return np.pad(x, widths, constant_values=value)

    copy = None
    if all(p.copy is not None for p in parts):
        copy = np.concatenate([pad(p.copy, 0.0, 3) for p in parts])
    return Candidates(
        prefixes=np.concatenate([pad(p.prefixes, -1, 2) for p in parts]),
        prefix_logp=np.concatenate([pad(p.prefix_logp, -np.inf, 2) for p in parts]),
        items=np.concatenate([pad(p.items, -1, 3) for p in parts]),
        cosine=np.concatenate([pad(p.cosine, -np.inf, 3) for p in parts]),
        k_for_spread=parts[0].k_for_spread,
        copy=copy,
    )


def save_candidates(path: Any, c: Candidates) -> None:
    """Steps 1-2 of a split as ``.npz`` (scores as float32), written atomically."""
    extra = {} if c.copy is None else {"copy": c.copy.astype(np.float32)}
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, prefixes=c.prefixes, prefix_logp=c.prefix_logp, items=c.items,
                            cosine=c.cosine.astype(np.float32), k_for_spread=c.k_for_spread,
                            **extra)


def load_candidates(path: Any) -> Candidates:
    """What :func:`save_candidates` wrote."""
    with np.load(path) as d:
        return Candidates(d["prefixes"], d["prefix_logp"], d["items"],
                          d["cosine"].astype(np.float64), int(d["k_for_spread"]),
                          d["copy"].astype(np.float64) if "copy" in d else None)


def decode_split(decoder: SigmaDecoder, examples: list[Any], n: int, batch_size: int,
                 masks: list[np.ndarray | None], desc: str) -> tuple[list[Candidates], float]:
    """Steps 1-2 for every example under each filter of ``masks`` (None = no filter), all from
    the same prompt forwards; returns one Candidates per filter and the seconds spent."""
    parts: list[list[Candidates]] = [[] for _ in masks]
    t0 = time.perf_counter()
    # Prompts of similar length batched together: less left padding to compute.
    order = np.argsort([len(e.input_ids) for e in examples], kind="stable")
    for s in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        rows = order[s:s + batch_size]
        batch = decoder.batch([examples[r] for r in rows])
        for acc, c in zip(parts, decoder.candidates_multi(
                batch, n, [None if m is None else m[rows] for m in masks]), strict=True):
            acc.append(c)
    back = np.argsort(order, kind="stable")
    out = []
    for acc in parts:
        cands = concat_candidates(acc)
        out.append(Candidates(cands.prefixes[back], cands.prefix_logp[back], cands.items[back],
                              cands.cosine[back], cands.k_for_spread,
                              None if cands.copy is None else cands.copy[back]))
    return out, time.perf_counter() - t0


def fill_lists(items: np.ndarray, popularity_order: np.ndarray) -> tuple[np.ndarray, int]:
    """Replace -1 padding by the most popular items not already listed; returns the count."""
    out, filled = items.copy(), 0
    for row in out:
        holes = np.flatnonzero(row < 0)
        if len(holes):
            extra = popularity_order[~np.isin(popularity_order, row)][: len(holes)]
            row[holes[: len(extra)]] = extra
            filled += len(holes)
    return out, filled


def rankings_frame(instances: pd.DataFrame, items: np.ndarray, scores: np.ndarray
                   ) -> pd.DataFrame:
    return pd.DataFrame({"instance_id": instances["instance_id"].to_numpy(np.int64),
                         "items": list(items.astype(np.int64)),
                         "scores": list(np.asarray(scores, dtype=np.float64))})


def task_hr(instances: pd.DataFrame, items: np.ndarray, k: int = 10) -> float:
    """HR@k averaged over tasks (each task weighs the same, as in the comparison tables)."""
    hr = accuracy_metrics(items[:, :k], list(instances["targets"]), [k])[f"HR@{k}"]
    return float(pd.Series(hr).groupby(instances["task"].to_numpy()).mean().mean())


def adaptive_taus(cands: Candidates, tau_grid: list[float], fallback: float) -> list[float]:
    """The adaptive-fusion grid of ``cands``: s (the spread of the top-K prefix probabilities)
    is small - about 1/K - so adaptive tau lives on another scale than fixed tau; the grid is
    ``tau_grid`` times the median s, so both modes try the same effective temperatures."""
    s_med = float(np.median(prefix_spread(cands.prefix_logp, cands.k_for_spread)))
    return [t * s_med for t in tau_grid] if s_med > 0 else [fallback]


def mode_taus(mode: str, cands: Candidates, tau_grid: list[float], fallback: float
              ) -> list[float]:
    """The tau grid a fusion mode is tuned over: adaptive's is rescaled by the spread
    (:func:`adaptive_taus`); fixed and joint divide raw scores by tau, so they share the grid."""
    return adaptive_taus(cands, tau_grid, fallback) if mode == "adaptive" else list(tau_grid)


def copy_scales(gcfg: Any, cands: Candidates) -> list[float]:
    """The copy scales tried on validation: ``copy_scale_grid`` for a repeat-aware model, and
    only 1 (the copy term as trained) for a model without a copy term."""
    return sorted({1.0, *gcfg.copy_scale_grid}) if cands.copy is not None else [1.0]


def rank_with_masks(model: Any, data: ProcessedData, instances: pd.DataFrame, top: int,
                    masks: np.ndarray | None, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Full-catalogue ranking; with ``masks``, admitted items rank above every other item."""
    users = instances["user_idx"].to_numpy()
    hist = data.histories(instances)
    out_i, out_s = [], []
    for s in range(0, len(instances), batch_size):
        with torch.no_grad():
            sc = model.score(users[s:s + batch_size], hist[s:s + batch_size]).float()
        if masks is not None:
            ok = torch.from_numpy(masks[s:s + batch_size])
            # Shift the rest below the lowest admitted score; the original order is kept.
            low = sc.min() - sc.max() - 1.0
            sc = torch.where(ok, sc, sc + low)
        idx, val = top_n(sc, top)
        out_i.append(idx)
        out_s.append(val)
    return np.concatenate(out_i), np.concatenate(out_s)


class GenerationStage(Stage):
    name: ClassVar[str] = "generation"
    requires: ClassVar[tuple[str, ...]] = ("data", "baselines", "grounding", "tokenization",
                                           "tasks", "training")
    config_sections: ClassVar[tuple[str, ...]] = ("eval", "generation", "backbone")

    def run(self, ctx: StageContext) -> dict[str, Any]:
        cfg = ctx.config
        data = ProcessedData.load(ctx.input("data"))
        inst = {s: pd.read_parquet(ctx.input("tasks") / f"{s}.parquet") for s in SPLITS}
        if all(df.empty for df in inst.values()):
            raise StageError(f"{ctx.input('tasks')}: no valid/test task instances to rank")
        n = cfg.eval.top_n
        if n < max(cfg.eval.ks):
            raise StageError(f"eval.top_n ({n}) is below the largest eval.ks ({max(cfg.eval.ks)})")
        tasks = load_tasks(data, cfg.tasks)
        t0 = time.perf_counter()
        masks = {s: instance_allow_masks(data, df, tasks) for s, df in inst.items()}
        log.info("generation: rule masks for %d instances in %.1fs",
                 sum(len(df) for df in inst.values()), time.perf_counter() - t0)
        popularity = np.argsort(-data.train_item_counts, kind="stable")
        summary: dict[str, Any] = {"instances": {s: len(df) for s, df in inst.items()}}

        summary["sigma"] = self._sigma(ctx, data, inst, masks, popularity, n)
        summary["baselines"] = self._baselines(ctx, data, inst, masks, n)
        return summary

    # ------------------------------------------------------------------------------ SIGMA
    def _sigma(self, ctx: StageContext, data: ProcessedData, inst: dict[str, pd.DataFrame],
               masks: dict[str, np.ndarray], popularity: np.ndarray, n: int) -> dict[str, Any]:
        gcfg = ctx.config.generation
        run = load_run_model(ctx.run_dir, gcfg.k_prefixes, gcfg.m_per_prefix)
        model, decoder, vocab, item_prefix = run.model, run.decoder, run.vocab, run.item_prefix
        cands, seconds, rule = {}, {}, {}
        matcher = data_matcher(model.cfg, data, run.config.tasks)
        for split, df in inst.items():
            if df.empty:
                continue
            ex = to_examples(df, model, vocab, item_prefix, with_target=False, matcher=matcher,
                             style=run.prompt)
            allow = None
            if gcfg.exclude_seen:
                allow = np.ones((len(df), data.n_items), dtype=bool)
                for r, h in enumerate(data.histories(df)):
                    allow[r, h] = False
            filters = [allow]
            if gcfg.rule_filtered_sigma:
                # sigma+rule: the task's checkable rule as a business filter inside the subset
                # search, decoded from the same prompt forwards as the unfiltered lists (on
                # validation too: its tau is chosen on filtered lists).
                filters.append(masks[split] if allow is None else masks[split] & allow)
            found, seconds[split] = decode_split(decoder, ex, n, gcfg.batch_size, filters,
                                                 f"sigma {split}")
            cands[split] = found[0]
            if len(found) > 1:
                rule[split] = found[1]
            log.info("generation: SIGMA decoded %d %s instances in %.1fs (%.1f users/s)",
                     len(df), split, seconds[split], len(df) / max(seconds[split], 1e-9))

        # Steps 1-2 kept: any fusion, tau or copy scale can be re-sorted later without the model.
        for split, c in cands.items():
            save_candidates(ctx.out / f"candidates_{split}.npz", c)
        # The mode of the `sigma` and `sigma+rule` lists (and of serving); every other mode in
        # `variants` is a re-sort of the same candidates, written as sigma_<mode>.
        main = gcfg.fusion
        tuned = tuned_mode(main)
        k_used = self._choose_k(gcfg, inst, cands, n, tuned)
        if k_used < gcfg.k_prefixes:
            cands = {split: truncate(c, k_used) for split, c in cands.items()}
        taus, scales = self._choose_tau(gcfg, inst, cands, n, {tuned, *gcfg.variants})
        if rule:
            # All of the filtered beam stays (it was widened where the rule needed it), but s
            # is taken over the same number of prefixes as for the unfiltered lists.
            rule = {split: dataclasses.replace(c, k_for_spread=min(k_used, c.k_for_spread))
                    for split, c in rule.items()}
            for split, c in rule.items():
                save_candidates(ctx.out / f"candidates_rule_{split}.npz", c)
            taus["rule"], scales["rule"] = self._choose_rule_tau(gcfg, inst, rule,
                                                                 taus[tuned], n, tuned)
        scale = scales[tuned]
        per_task: dict[str, dict[str, list[float]]] = {}
        if gcfg.fusion_per_task and gcfg.select_tau and "valid" in cands and main != "off":
            c = cands["valid"]
            per_task[main] = self._choose_per_task(
                gcfg, inst["valid"], c, mode_taus(main, c, gcfg.tau_grid, gcfg.tau),
                copy_scales(gcfg, c), (taus[main], scale), n, "sigma", main)
            if "valid" in rule:
                c = rule["valid"]
                per_task["rule"] = self._choose_per_task(
                    gcfg, inst["valid"], c,
                    sorted({*mode_taus(main, c, gcfg.tau_grid, taus[main]), taus[main]}),
                    copy_scales(gcfg, c), (taus["rule"], scales["rule"]), n, "sigma+rule",
                    main)

        def lists(c: Candidates, df: pd.DataFrame, which: str, default: tuple[float, float]
                  ) -> tuple[np.ndarray, np.ndarray]:
            chosen = {t: (v[0], v[1]) for t, v in per_task.get(which, {}).items()}
            return fuse_by_group(c, df["task"].to_numpy(), chosen, default, n, main)

        out: dict[str, Any] = {"fusion": main, "tau": taus, "copy_scale": scales,
                               "per_task": per_task, "k_prefixes": k_used,
                               "seconds": {s: round(v, 2) for s, v in seconds.items()},
                               "users_per_s": {s: round(len(inst[s]) / max(v, 1e-9), 2)
                                               for s, v in seconds.items()}}
        filled_total = 0
        final: dict[str, np.ndarray] = {}
        for mode in dict.fromkeys([main, *gcfg.variants]):
            name = "sigma" if mode == main else f"sigma_{mode}"
            for split, c in cands.items():
                items, scores = fuse(c, mode, taus.get(mode, gcfg.tau), n,
                                     scales.get(mode, 1.0))
                if mode == main and main in per_task:
                    # The single choice stays as its own model: per-task against global in
                    # the same run.
                    write_parquet(ctx.out / "rankings" / f"sigma_global_{split}.parquet",
                                  rankings_frame(inst[split], fill_lists(items, popularity)[0],
                                                 scores))
                    items, scores = lists(c, inst[split], main, (taus[mode], scale))
                if mode == main:
                    final[split] = items
                items, filled = fill_lists(items, popularity)
                filled_total += filled
                write_parquet(ctx.out / "rankings" / f"{name}_{split}.parquet",
                              rankings_frame(inst[split], items, scores))
        out["filled_from_popularity"] = filled_total
        for split, c in rule.items():
            default = (taus["rule"], scales["rule"])
            items, scores = fuse(c, tuned, default[0], n, default[1])
            if "rule" in per_task:
                write_parquet(ctx.out / "rankings" / f"sigma_global+rule_{split}.parquet",
                              rankings_frame(inst[split], fill_lists(items, popularity)[0],
                                             scores))
                items, scores = lists(c, inst[split], "rule", default)
            # Lists stay full as the baselines' '+rule' lists do: admitted items first, then
            # the most popular others.
            items, _ = fill_lists(items, popularity)
            write_parquet(ctx.out / "rankings" / f"sigma+rule_{split}.parquet",
                          rankings_frame(inst[split], items, scores))
        out["diagnostics"] = self._diagnostics(ctx, model, inst, cands, final)
        self._tau_curve(ctx, data, inst, cands, taus, scales, n)
        out["prefix_usage"] = self._prefix_usage(ctx, model, cands, final)
        self._examples(ctx, data, inst, final)
        return out

    def _choose_per_task(self, gcfg: Any, df: pd.DataFrame, c: Candidates, taus: list[float],
                         scales: list[float], default: tuple[float, float], n: int,
                         label: str, mode: str = "adaptive") -> dict[str, list[float]]:
        """{task: [tau, copy scale]} of ``mode`` fusion by each task's own validation HR@10,
        over the grid the single choice searched; a task with fewer than
        ``per_task_min_valid`` instances keeps ``default`` (the single choice), as do ties."""
        tasks = df["task"].to_numpy()
        targets = list(df["targets"])
        hits = {(t, a): np.asarray(accuracy_metrics(fuse(c, mode, t, n, a)[0][:, :10],
                                                    targets, [10])["HR@10"], dtype=float)
                for t in taus for a in scales}
        hits.setdefault(default, np.asarray(accuracy_metrics(
            fuse(c, mode, default[0], n, default[1])[0][:, :10], targets,
            [10])["HR@10"], dtype=float))
        out: dict[str, list[float]] = {}
        for task in sorted(set(tasks.tolist())):
            rows = tasks == task
            if rows.sum() < gcfg.per_task_min_valid:
                continue
            best = max(hits, key=lambda ta: (round(float(hits[ta][rows].mean()), 6),
                                             ta == default))
            out[task] = [float(best[0]), float(best[1])]
        log.info("generation: %s, (tau, copy scale) per task by validation HR@10 %s "
                 "(all tasks: %s)", label, out, default)
        return out

    def _choose_k(self, gcfg: Any, inst: dict[str, pd.DataFrame],
                  cands: dict[str, Candidates], n: int, mode: str = "adaptive") -> int:
        """K from ``k_grid`` (and k_prefixes) by validation HR@10 of ``mode`` fusion at its
        best tau; the test candidates are never looked at."""
        grid = sorted({*gcfg.k_grid, gcfg.k_prefixes})
        if len(grid) == 1 or "valid" not in cands:
            return gcfg.k_prefixes
        best: dict[int, float] = {}
        for k in grid:
            c = truncate(cands["valid"], k)
            taus = mode_taus(mode, c, gcfg.tau_grid, gcfg.tau)
            best[k] = max(task_hr(inst["valid"], fuse(c, mode, t, n)[0]) for t in taus)
        # Ties go to the smaller K (cheaper to serve).
        k_used = max(grid, key=lambda k: (round(best[k], 6), -k))
        log.info("generation: validation HR@10 by K %s -> K %d",
                 {k: round(v, 4) for k, v in best.items()}, k_used)
        return k_used

    def _choose_rule_tau(self, gcfg: Any, inst: dict[str, pd.DataFrame],
                         rule: dict[str, Candidates], tau_plain: float, n: int,
                         mode: str = "adaptive") -> tuple[float, float]:
        """tau (and copy scale) of sigma+rule's ``mode`` fusion, from its own (rule-filtered)
        validation lists: under a filter the candidates are other items, often fewer
        prefixes, and another balance between prefix and in-prefix scores may win. Without
        validation lists (or ``select_tau`` off) the unfiltered lists' tau is used."""
        if not gcfg.select_tau or "valid" not in rule:
            return tau_plain, 1.0
        c = rule["valid"]
        grid = sorted({*mode_taus(mode, c, gcfg.tau_grid, tau_plain), tau_plain})
        scores = {(t, a): task_hr(inst["valid"], fuse(c, mode, t, n, a)[0])
                  for t in grid for a in copy_scales(gcfg, c)}
        # Ties go to the unfiltered lists' tau, then to the unscaled copy term.
        tau, scale = max(scores, key=lambda ta: (round(scores[ta], 6), ta[0] == tau_plain,
                                                 ta[1] == 1.0))
        log.info("generation: sigma+rule, validation HR@10 by (tau, copy scale) %s -> %s",
                 {f"{t:.3g},{a:g}": round(v, 4) for (t, a), v in scores.items()}, (tau, scale))
        return tau, scale

    def _choose_tau(self, gcfg: Any, inst: dict[str, pd.DataFrame],
                    cands: dict[str, Candidates], n: int, modes: set[str] | None = None
                    ) -> tuple[dict[str, float], dict[str, float]]:
        """tau and the copy scale (jointly) per fusion mode (adaptive, fixed, joint: those in
        ``modes``) by validation HR@10: the fusion ablation tunes the same knobs on every side.
        ``off`` keeps the copy term as trained."""
        tuned = [m for m in ("adaptive", "fixed", "joint") if m in (modes or {"adaptive"})]
        taus = {m: gcfg.tau for m in tuned}
        scales = {m: 1.0 for m in tuned}
        if not gcfg.select_tau or "valid" not in cands:
            return taus, scales
        c = cands["valid"]
        grids = {m: mode_taus(m, c, gcfg.tau_grid, gcfg.tau) for m in tuned}
        for mode in tuned:
            alphas = copy_scales(gcfg, c)
            scores = {(t, a): task_hr(inst["valid"], fuse(c, mode, t, n, a)[0])
                      for t in grids[mode] for a in alphas}
            # Ties go to the middle of the grid rather than to an extreme, then to the
            # unscaled copy term.
            mid = grids[mode][len(grids[mode]) // 2]
            taus[mode], scale = max(scores, key=lambda ta: (
                round(scores[ta], 6), -abs(np.log(ta[0] / mid)), ta[1] == 1.0))
            scales[mode] = scale
            log.info("generation: %s fusion, validation HR@10 by (tau, copy scale) %s -> %s",
                     mode, {f"{t:.3g},{a:g}": round(v, 4) for (t, a), v in scores.items()},
                     (taus[mode], scale))
        return taus, scales

    def _tau_curve(self, ctx: StageContext, data: ProcessedData, inst: dict[str, pd.DataFrame],
                   cands: dict[str, Candidates], taus: dict[str, float],
                   scales: dict[str, float], n: int) -> None:
        """Accuracy and diversity of fixed-tau fusion as tau varies (at its chosen copy scale),
        plus the adaptive and joint points (at their chosen tau) where they were tuned."""
        ev = ctx.config.eval
        cats = category_codes(data.items["category_path"].tolist(), ev.category_level)
        head = head_mask(data.train_item_counts, ev.long_tail_head_share)
        rows = []
        points = [("fixed", t) for t in ctx.config.generation.tau_grid]
        points += [(m, taus[m]) for m in ("adaptive", "joint") if m in taus] + [("off", 1.0)]
        for split, c in cands.items():
            df = inst[split]
            hist = data.histories(df)
            for mode, tau in points:
                a = scales.get(mode, 1.0)
                items = fill_lists(fuse(c, mode, tau, n, a)[0], np.arange(data.n_items))[0]
                acc = accuracy_metrics(items, list(df["targets"]), [10])
                bey = beyond_metrics(items, [10], cats, head, hist)
                rows.append({"split": split, "mode": mode, "tau": tau,
                             "HR@10": float(pd.Series(acc["HR@10"]).groupby(
                                 df["task"].to_numpy()).mean().mean()),
                             "NDCG@10": float(acc["NDCG@10"].mean()),
                             "Categories@10": float(bey["Categories@10"].mean()),
                             "Coverage@10": len(np.unique(items[:, :10])) / data.n_items,
                             "NewToUser@10": float(bey["NewToUser@10"].mean())})
        pd.DataFrame(rows).to_csv(ctx.out / "tau_curve.csv", index=False)

    def _diagnostics(self, ctx: StageContext, model: Any, inst: dict[str, pd.DataFrame],
                     cands: dict[str, Candidates], final: dict[str, np.ndarray]
                     ) -> dict[str, Any]:
        """Where the HR@10 of SIGMA is lost, per task: the target's prefix is not among the K
        (prefix miss), it is but the target is not among that prefix's M candidates
        (retrieval miss), or it is a candidate but not in the final top 10 (fusion miss)."""
        prefix_of = model.item_prefix.cpu().numpy()
        out: dict[str, Any] = {}
        for split, c in cands.items():
            df = inst[split]
            top = final[split][:, :10]
            rows = []
            for r, tgt in enumerate(df["targets"]):
                tgt = np.asarray(tgt, dtype=np.int64)
                p_hit = bool(np.isin(prefix_of[tgt], c.prefixes[r]).any())
                c_hit = bool(np.isin(tgt, c.items[r]).any())
                hit = bool(np.isin(tgt, top[r]).any())
                rows.append((p_hit, c_hit, hit))
            arr = pd.DataFrame(rows, columns=["prefix_hit", "candidate_hit", "hit"])
            arr["task"] = df["task"].to_numpy()
            per = arr.groupby("task").mean()
            res = {task: {"prefix_hit@K": round(float(v.prefix_hit), 4),
                          "candidate_hit@KM": round(float(v.candidate_hit), 4),
                          "HR@10": round(float(v.hit), 4),
                          "prefix_miss": round(1 - float(v.prefix_hit), 4),
                          "retrieval_miss": round(float(v.prefix_hit - v.candidate_hit), 4),
                          "fusion_miss": round(float(v.candidate_hit - v.hit), 4)}
                   for task, v in per.iterrows()}
            used = prefix_of[top[top >= 0]]
            res["_prefixes_in_top10_lists"] = int(len(np.unique(used)))
            out[split] = res
        write_json(ctx.out / "diagnostics.json", out)
        return {s: {t: v for t, v in r.items() if t in ("JustForYou", "_prefixes_in_top10_lists")}
                for s, r in out.items()}

    def _prefix_usage(self, ctx: StageContext, model: Any, cands: dict[str, Candidates],
                      final: dict[str, np.ndarray]) -> dict[str, Any]:
        """How many prefixes a top-10 draws from, and how much of the prefix space is used."""
        if "test" not in cands:
            return {}
        items = final["test"][:, :10]
        prefix_of = model.item_prefix.cpu().numpy()
        per_list = [len(np.unique(prefix_of[r[r >= 0]])) for r in items]
        used = np.unique(prefix_of[items[items >= 0]])
        sizes = np.bincount(prefix_of, minlength=model.n_prefixes)
        hits = np.bincount(prefix_of[items[items >= 0]], minlength=model.n_prefixes)
        out = {"prefixes_per_top10_mean": float(np.mean(per_list)),
               "prefixes_per_top10_hist": np.bincount(per_list, minlength=11).tolist(),
               "prefixes_used": int(len(used)), "n_prefixes": int(model.n_prefixes),
               "prefix_sizes": sizes.tolist(), "prefix_hits": hits.tolist(),
               "top1_prefix_prob_mean": float(np.exp(cands["test"].prefix_logp[:, 0]).mean())}
        write_json(ctx.out / "prefix_usage.json", out)
        return {k: v for k, v in out.items() if not isinstance(v, list)}

    def _examples(self, ctx: StageContext, data: ProcessedData, inst: dict[str, pd.DataFrame],
                  final: dict[str, np.ndarray]) -> None:
        per = ctx.config.generation.examples
        if "test" not in final or per == 0:
            write_json(ctx.out / "examples.json", [])
            return
        df = inst["test"]
        items = final["test"]
        text = data.items["title"].fillna("").astype(str) + " | " + \
            data.items["category_path"].fillna("").astype(str)
        out = []
        for task, idx in df.groupby("task").indices.items():
            for r in idx[:per]:
                row = df.iloc[r]
                out.append({
                    "task": task, "instance_id": int(row["instance_id"]),
                    "instruction": row["instruction"],
                    "history": [text.iloc[i] for i in np.asarray(row["history"])[-5:]],
                    "targets": [text.iloc[i] for i in np.asarray(row["targets"])[:5]],
                    "sigma_top5": [{"item": text.iloc[i], "hit": bool(i in set(row["targets"]))}
                                   for i in items[r, :5] if i >= 0],
                })
        write_json(ctx.out / "examples.json", out)

    # ------------------------------------------------------------------------------ baselines
    def _baselines(self, ctx: StageContext, data: ProcessedData, inst: dict[str, pd.DataFrame],
                   masks: dict[str, np.ndarray], n: int) -> dict[str, Any]:
        cfg, gcfg = ctx.config, ctx.config.generation
        names = gcfg.baselines if gcfg.baselines is not None else list(cfg.baselines.enabled)
        out: dict[str, Any] = {}
        for name in names:
            t0 = time.perf_counter()
            model = restore(name, cfg, ctx.input("baselines") / "models" / name, data)
            variants = [(name, False)] + ([(f"{name}+rule", True)]
                                          if gcfg.rule_filtered_baselines else [])
            for label, filtered in variants:
                for split, df in inst.items():
                    if df.empty:
                        continue
                    items, scores = rank_with_masks(model, data, df, n,
                                                    masks[split] if filtered else None,
                                                    cfg.eval.batch_size)
                    write_parquet(ctx.out / "rankings" / f"{label}_{split}.parquet",
                                  rankings_frame(df, items, scores))
            out[name] = {"seconds": round(time.perf_counter() - t0, 2)}
        return out
