"""Training SASRec on windows of the users' training sequences, early-stopped on validation.

Every position of a window predicts the next item, so a window of ``max_len + 1`` items yields up
to ``max_len`` targets; long histories are cut into windows ending every ``window_stride`` items
(default ``max_len``: no overlap), so every training purchase is a target at least once.

Two objectives, chosen by name:
  * ``bce`` - one sampled negative per position and binary cross-entropy, the original SASRec
    recipe and the one the generative-recommendation papers compare against; the negative is
    uniform over the catalogue or (``negatives: unseen``, as in SASRec) outside the window;
  * ``ce``  - full softmax cross-entropy over the catalogue, usually clearly stronger.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import time
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sigmarec.baselines.base import Recommender, rank_instances
from sigmarec.baselines.sasrec.model import SASRec, score_histories
from sigmarec.config import EvalConfig, SASRecConfig
from sigmarec.data.processed import ProcessedData
from sigmarec.errors import ConfigError
from sigmarec.metrics import accuracy_metrics

log = logging.getLogger("sigmarec")

LOSSES = ("bce", "ce")
VALID_METRIC = "NDCG@10"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def training_windows(
    sequences: list[np.ndarray], max_len: int, stride: int | None = None
) -> np.ndarray:
    """(n_windows, max_len + 1) shifted item ids (0 = padding, left-padded).

    Windows end at ``len(s), len(s) - stride, ...``; each holds up to ``max_len + 1`` items, so with
    ``stride <= max_len`` the targets (items 1.. of a window) cover every item but a user's first.
    """
    stride = stride or max_len
    rows: list[np.ndarray] = []
    for s in sequences:
        s = np.asarray(s, dtype=np.int64) + 1
        for end in range(len(s), 1, -stride):
            w = s[max(0, end - max_len - 1) : end]
            row = np.zeros(max_len + 1, dtype=np.int64)
            row[max_len + 1 - len(w) :] = w
            rows.append(row)
    if not rows:
        return np.zeros((0, max_len + 1), dtype=np.int64)
    return np.stack(rows)


def unseen_negatives(
    windows: torch.Tensor, n_items: int, width: int, generator: torch.Generator | None = None,
    rounds: int = 20,
) -> torch.Tensor:
    """(B, width) shifted item ids drawn uniformly from the items that are not in their row of
    ``windows`` (B, *): every hit is redrawn, up to ``rounds`` times (a row that holds nearly the
    whole catalogue may keep a hit; on real catalogues one round leaves ~1e-3 of them)."""
    rows = windows.cpu()
    neg = torch.randint(1, n_items + 1, (len(rows), width), generator=generator)
    for _ in range(rounds):
        hit = (neg.unsqueeze(-1) == rows.unsqueeze(1)).any(-1)
        n_hit = int(hit.sum())
        if not n_hit:
            break
        neg[hit] = torch.randint(1, n_items + 1, (n_hit,), generator=generator)
    return neg


def sasrec_loss(
    model: SASRec, batch: torch.Tensor, loss: str, generator: torch.Generator | None = None,
    ce_target_fraction: float = 1.0, negatives: str = "uniform",
) -> torch.Tensor:
    """Mean next-item loss over the non-padding targets of a (B, max_len + 1) window batch.

    ``ce_target_fraction`` < 1 (CE only): a uniform random subset of that share of the targets
    is scored, an unbiased estimate of the same mean at that share of the logits' cost.
    ``negatives`` (BCE only): "uniform" over the catalogue, or "unseen" (no item of the window)."""
    # Leading columns that are padding in every row are dropped: the model right-aligns
    # positions and masks padding, so the states of the kept positions are the same, and short
    # histories (Amazon Beauty: median 6 items in windows of 51) then cost only their length.
    filled = (batch != 0).any(0).nonzero()
    if len(filled):
        batch = batch[:, min(int(filled[0]), batch.shape[1] - 2):]
    inp, tgt = batch[:, :-1], batch[:, 1:]
    states = model(inp)
    # A target needs a real item as input: in a left-padded window the first item follows padding
    # and has nothing to be predicted from (as in SASRec, a user's first item is never a target).
    valid = (tgt != 0) & (inp != 0)
    h, pos = states[valid], tgt[valid]  # only real targets cost logits (long CE rows are big)
    if loss == "ce":
        if ce_target_fraction < 1.0 and len(pos) > 1:
            keep = max(1, round(len(pos) * ce_target_fraction))
            pick = torch.randperm(len(pos), generator=generator)[:keep].to(pos.device)
            h, pos = h[pick], pos[pick]
        return F.cross_entropy(model.logits(h), pos - 1)
    if loss == "bce":
        if negatives == "uniform":
            neg = torch.randint(1, model.n_items + 1, pos.shape, generator=generator)
        elif negatives == "unseen":
            neg = unseen_negatives(batch, model.n_items, tgt.shape[1], generator)
            neg = neg[valid.cpu()]
        else:
            raise ConfigError(f"unknown SASRec negatives {negatives!r}; use uniform or unseen")
        neg = neg.to(pos.device)
        pos_logit = (h * model.item_emb(pos)).sum(-1)
        neg_logit = (h * model.item_emb(neg)).sum(-1)
        return F.binary_cross_entropy_with_logits(
            pos_logit, torch.ones_like(pos_logit)
        ) + F.binary_cross_entropy_with_logits(neg_logit, torch.zeros_like(neg_logit))
    raise ConfigError(f"unknown SASRec loss {loss!r}; use one of {LOSSES}")


class _Frozen(Recommender):
    """Adapter so validation ranks exactly as the evaluation does (``rank_instances``)."""

    name: ClassVar[str] = "sasrec_validation"

    def __init__(self, model: SASRec) -> None:
        self.model = model

    def fit(self, data: ProcessedData) -> dict[str, Any]:
        return {}

    def score(self, users: np.ndarray, histories: list[np.ndarray]) -> torch.Tensor:
        return score_histories(self.model, histories)


def validation_instances(data: ProcessedData, users: int | None, seed: int) -> pd.DataFrame:
    """The validation instances, or those of ``users`` users drawn once with ``seed``."""
    inst = data.eval_instances("valid")
    if users is None or users >= inst["user_idx"].nunique():
        return inst
    pick = np.random.default_rng(seed).choice(inst["user_idx"].unique(), users, replace=False)
    return inst[inst["user_idx"].isin(pick)].reset_index(drop=True)


def validation_ndcg(
    model: SASRec, data: ProcessedData, eval_cfg: EvalConfig, inst: pd.DataFrame | None = None
) -> float:
    inst = data.eval_instances("valid") if inst is None else inst
    # Batches of similar history length pad to little (every epoch ranks every user; on Amazon
    # Beauty most histories are a few items, the longest 200); the mean does not depend on order.
    inst = inst.iloc[np.argsort(inst["hist_len"].to_numpy(), kind="stable")]
    ranked = rank_instances(
        _Frozen(model), data, inst, top=10, exclude_seen=eval_cfg.exclude_seen,
        batch_size=eval_cfg.batch_size,
    )
    metrics = accuracy_metrics(np.stack(ranked["items"].to_list()), list(inst["targets"]), [10])
    return float(metrics[VALID_METRIC].mean())


def train_sasrec(
    data: ProcessedData,
    cfg: SASRecConfig,
    loss: str,
    seed: int = 0,
    eval_cfg: EvalConfig | None = None,
    progress: bool | None = None,
    label: str = "sasrec",
) -> tuple[SASRec, dict[str, Any]]:
    """Train one configuration; return the model with its best-validation weights and a summary.

    ``progress=None`` shows the tqdm bar only on a terminal. Without validation instances the
    model simply trains ``max_epochs`` and keeps its last weights.
    """
    if loss not in LOSSES:
        raise ConfigError(f"unknown SASRec loss {loss!r}; use one of {LOSSES}")
    eval_cfg = eval_cfg or EvalConfig()
    device = resolve_device(cfg.device)
    torch.manual_seed(seed)  # model init and dropout
    gen = torch.Generator().manual_seed(seed)  # window order and negatives

    windows = torch.from_numpy(training_windows(data.train_sequences(), cfg.max_len,
                                                cfg.window_stride))
    if len(windows) == 0:
        raise ConfigError("sasrec: no user has two training interactions; nothing to learn")
    model = SASRec(data.n_items, cfg.hidden, cfg.blocks, cfg.heads, cfg.dropout, cfg.max_len)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            betas=(0.9, cfg.adam_beta2))
    steps = math.ceil(len(windows) / cfg.batch_size)
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    valid_inst = validation_instances(data, cfg.valid_users, seed)
    has_valid = len(valid_inst) > 0

    best, best_epoch, best_state, bad = -1.0, 0, None, 0
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    for epoch in range(1, cfg.max_epochs + 1):
        model.train()
        # A fresh random order each epoch; with a step cap this samples windows at random.
        order = torch.randperm(len(windows), generator=gen)
        losses: list[float] = []
        bar = tqdm(range(steps), desc=f"{label} epoch {epoch}", leave=False, disable=(
            None if progress is None else not progress))
        for step in bar:
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            batch = windows[idx].to(device)
            value = sasrec_loss(model, batch, loss, gen, cfg.ce_target_fraction, cfg.negatives)
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            losses.append(value.item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        bar.close()
        row = {"epoch": epoch, "loss": round(float(np.mean(losses)), 5)}
        # The last epoch is always validated, so a cap that is no multiple of valid_every still
        # gets its final weights compared.
        validate = has_valid and (epoch % cfg.valid_every == 0 or epoch == cfg.max_epochs)
        if validate:
            score = validation_ndcg(model, data, eval_cfg, valid_inst)
            row["valid_ndcg10"] = round(score, 5)
            improved = score > best
            if improved:
                best, best_epoch, bad = score, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad += 1
            log.info("%s epoch %d: loss %.4f, valid NDCG@10 %.4f%s", label, epoch, row["loss"],
                     score, " (best)" if improved else "")
        else:
            log.info("%s epoch %d: loss %.4f", label, epoch, row["loss"])
        history.append(row)
        if validate and bad >= cfg.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)  # early stopping keeps the best epoch, not the last
    model.eval()
    summary = {
        "loss": loss,
        "device": str(device),
        "windows": len(windows),
        "steps_per_epoch": steps,
        "epochs_run": len(history),
        "best_epoch": best_epoch if has_valid else len(history),
        "valid_ndcg10": round(best, 5) if has_valid else None,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(time.perf_counter() - start, 2),
        "history": history,
    }
    return model, summary


def tune_grid(tune: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """All combinations of the grid (one empty combination when there is no grid)."""
    unknown = set(tune) - (set(SASRecConfig.model_fields) - {"tune"})
    if unknown:
        raise ConfigError(f"sasrec.tune: unknown hyper-parameters {sorted(unknown)}")
    keys = sorted(tune)
    combos = itertools.product(*(tune[k] for k in keys))
    return [dict(zip(keys, vals, strict=True)) for vals in combos]


def fit_sasrec(
    data: ProcessedData,
    cfg: SASRecConfig,
    loss: str,
    seed: int = 0,
    eval_cfg: EvalConfig | None = None,
    progress: bool | None = None,
    label: str = "sasrec",
) -> tuple[SASRec, SASRecConfig, dict[str, Any]]:
    """Train every combination of ``cfg.tune`` (or just ``cfg``) and keep the best on validation.

    Returns the model, the configuration it was trained with, and a summary that lists the tried
    configurations with their validation NDCG@10.
    """
    grid = tune_grid(cfg.tune)
    best: tuple[SASRec, SASRecConfig, dict[str, Any]] | None = None
    tried: list[dict[str, Any]] = []
    for combo in grid:
        try:
            trial_cfg = SASRecConfig.model_validate({**cfg.model_dump(), **combo, "tune": {}})
        except ValueError as e:
            raise ConfigError(f"sasrec.tune: invalid combination {combo}: {e}") from None
        tag = label + "".join(f" {k}={v}" for k, v in combo.items())
        model, summary = train_sasrec(data, trial_cfg, loss, seed, eval_cfg, progress, tag)
        tried.append({**combo, "valid_ndcg10": summary["valid_ndcg10"],
                      "best_epoch": summary["best_epoch"],
                      "train_seconds": summary["train_seconds"]})
        score = summary["valid_ndcg10"] if summary["valid_ndcg10"] is not None else 0.0
        if best is None or score > (best[2]["valid_ndcg10"] or 0.0):
            best = (model, trial_cfg, summary)
        else:
            del model
    assert best is not None  # the grid always has at least one combination
    model, chosen, summary = best
    if len(grid) > 1:
        summary = {**summary, "tune": tried,
                   "chosen": {k: getattr(chosen, k) for k in sorted(cfg.tune)}}
    return model, chosen, summary
