"""Grounding losses and the training loop (with checkpoints and exact resume).

L_CL: symmetric in-batch InfoNCE over the text-embedding similarities of relevance pairs.
L_KD: KL(P_ID || P_text), the in-batch similarity distribution of frozen pre-trained item-ID
embeddings (the SASRec tower) distilled into the text one, so the text space also learns who buys
what together.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from sigmarec.config import GroundingConfig
from sigmarec.core.atomic import atomic_path
from sigmarec.grounding.encoder import ItemEncoder

log = logging.getLogger("sigmarec")


def _duplicate_mask(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """True where column j is the same item as row i's positive (j != i): a false negative."""
    same = (b[None, :] == b[:, None]) | (a[None, :] == b[:, None])
    same.fill_diagonal_(False)
    return same


def contrastive_loss(va: torch.Tensor, vb: torch.Tensor, tau: float,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE: row i's positive is column i, every other column a negative."""
    logits = va @ vb.T / tau
    if mask is not None:
        logits = logits.masked_fill(mask, -torch.inf)
    labels = torch.arange(len(va), device=va.device)
    return 0.5 * (nn.functional.cross_entropy(logits, labels)
                  + nn.functional.cross_entropy(logits.T, labels))


def distillation_loss(va: torch.Tensor, vb: torch.Tensor, ea: torch.Tensor, eb: torch.Tensor,
                      tau: float, kd_tau: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(P_ID || P_text) over in-batch similarity rows (and columns), averaged."""
    text = va @ vb.T / tau
    ids = ea @ eb.T / kd_tau
    if mask is not None:
        text = text.masked_fill(mask, -1e4)
        ids = ids.masked_fill(mask, -1e4)
    kl = nn.functional.kl_div
    rows = kl(text.log_softmax(-1), ids.log_softmax(-1), log_target=True, reduction="batchmean")
    cols = kl(text.T.log_softmax(-1), ids.T.log_softmax(-1), log_target=True,
              reduction="batchmean")
    return 0.5 * (rows + cols)


class PairSampler:
    """Draws each batch's pairs from the views in proportion to their weights."""

    def __init__(self, pairs: dict[str, pd.DataFrame], weights: dict[str, float], seed: int):
        self.views = [v for v, p in pairs.items() if len(p) and weights.get(v, 0) > 0]
        if not self.views:
            raise ValueError("no relevance pairs to train on (every view empty or weighted 0)")
        w = np.array([weights[v] for v in self.views], dtype=np.float64)
        self.p = w / w.sum()
        self.arrays = {v: pairs[v][["a", "b"]].to_numpy(np.int64) for v in self.views}
        self.rng = np.random.default_rng(seed)

    def sample(self, n: int) -> np.ndarray:
        which = self.rng.choice(len(self.views), size=n, p=self.p)
        out = np.empty((n, 2), dtype=np.int64)
        for i, v in enumerate(self.views):
            sel = which == i
            if sel.any():
                arr = self.arrays[v]
                out[sel] = arr[self.rng.integers(0, len(arr), size=int(sel.sum()))]
        return out


def _rng_state(sampler: PairSampler) -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": sampler.rng.bit_generator.state,
            "python": random.getstate()}


def train_grounding(
    encoder: ItemEncoder,
    texts: np.ndarray,
    pairs: dict[str, pd.DataFrame],
    cfg: GroundingConfig,
    id_emb: np.ndarray | None,
    seed: int,
    checkpoint_dir: Path | None = None,
) -> list[dict[str, float]]:
    """Train ``encoder`` for ``cfg.steps`` steps; resumes from ``checkpoint_dir`` if a checkpoint
    is there. Returns the per-step loss history."""
    sampler = PairSampler(pairs, {k: v.weight for k, v in cfg.views.items()}, seed)
    id_t = None
    if id_emb is not None and cfg.kd_weight > 0:
        id_t = nn.functional.normalize(torch.as_tensor(id_emb, dtype=torch.float32), dim=-1)
    backbone_params = [p for n, p in encoder.named_parameters()
                       if p.requires_grad and not n.startswith("proj.")]
    groups = [{"params": list(encoder.proj.parameters()), "lr": cfg.proj_lr}]
    if backbone_params:
        groups.append({"params": backbone_params, "lr": cfg.lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    history: list[dict[str, float]] = []
    start = 0
    ckpt = checkpoint_dir / "grounding.pt" if checkpoint_dir else None
    if ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        encoder.load_trainable_state(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, history = state["step"], state["history"]
        torch.set_rng_state(state["rng"]["torch"])
        sampler.rng.bit_generator.state = state["rng"]["numpy"]
        random.setstate(state["rng"]["python"])
        log.info("grounding: resumed from %s at step %d", ckpt, start)

    encoder.train()
    bar = tqdm(range(start, cfg.steps), desc="grounding", initial=start, total=cfg.steps,
               unit="step")
    for step in bar:
        batch = sampler.sample(cfg.batch_size)
        a, b = torch.as_tensor(batch[:, 0]), torch.as_tensor(batch[:, 1])
        va = encoder(list(texts[batch[:, 0]]))
        vb = encoder(list(texts[batch[:, 1]]))
        mask = _duplicate_mask(a, b)
        l_cl = contrastive_loss(va, vb, cfg.tau, mask)
        loss = l_cl
        l_kd = torch.zeros(())
        if id_t is not None:
            l_kd = distillation_loss(va, vb, id_t[a], id_t[b], cfg.tau, cfg.kd_tau, mask)
            loss = loss + cfg.kd_weight * l_kd
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        rec = {"step": step + 1, "loss": loss.item(), "l_cl": l_cl.item(), "l_kd": l_kd.item()}
        history.append(rec)
        bar.set_postfix(l_cl=f"{rec['l_cl']:.3f}", l_kd=f"{rec['l_kd']:.3f}")
        if ckpt is not None and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(ckpt) as tmp:
                torch.save({"model": encoder.trainable_state(), "optimizer": opt.state_dict(),
                            "step": step + 1, "history": history, "rng": _rng_state(sampler)},
                           tmp)
    encoder.eval()
    return history
