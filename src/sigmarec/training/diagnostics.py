"""Where SIGMA wins or loses during training: the prefix head against trivial estimates, and the
HR split into prefix misses and retrieval misses.

* **References for the prefix NTP** (no model): the marginal prior of the training targets'
  prefixes, and the prefixes the prompt itself shows (its history and frequent section) smoothed
  with that prior. A prefix head that does not beat the second has learned nothing a count could
  not tell.
* **Quick decode** (the model): top-K prefixes of the first level, the query vector per prefix,
  exhaustive search inside each prefix, ``P(c) · softmax(cos / τ)``. From it: HR@n, the prefix
  hit rate (a target's prefix among the K), the in-prefix hit rate (given a hit prefix, a target
  among the n best of that prefix), the prefix NTP of the targets, and how many distinct
  prefixes the top lists use (collapse onto a few prefixes shows here first).

All figures are per-instance means over the given examples; a per-task HR is returned too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from sigmarec.model.batch import PromptBatch
from sigmarec.tokenization.hybrid import flat_to_codes


def level0_codes(flat_prefix: np.ndarray, codebook_sizes: Sequence[int]) -> np.ndarray:
    """First-level code of flat prefix ids (the code generation step 1 predicts)."""
    return flat_to_codes(np.asarray(flat_prefix, dtype=np.int64), codebook_sizes)[:, 0]


def prefix_prior(train_targets: np.ndarray, codes0: np.ndarray, n_codes: int) -> np.ndarray:
    """Marginal distribution of the training targets' first-level codes (add-one smoothed)."""
    counts = np.bincount(codes0[np.asarray(train_targets, dtype=np.int64)], minlength=n_codes)
    return (counts + 1.0) / (counts.sum() + n_codes)


def reference_ntp(prompt_items: Sequence[np.ndarray], targets: Sequence[np.ndarray],
                  codes0: np.ndarray, prior: np.ndarray, beta: float = 10.0) -> dict[str, float]:
    """Prefix NTP (mean over instances of the mean -log p over its targets) of two estimates:
    ``prior`` alone, and the prompt's own prefix counts plus ``beta`` pseudo-counts of it."""
    n_codes = len(prior)
    nll_prior, nll_hist = [], []
    for items, tgt in zip(prompt_items, targets, strict=True):
        t = codes0[np.asarray(tgt, dtype=np.int64)]
        counts = np.bincount(codes0[np.asarray(items, dtype=np.int64)], minlength=n_codes)
        hist = (counts + beta * prior) / (counts.sum() + beta)
        nll_prior.append(float(-np.log(prior[t]).mean()))
        nll_hist.append(float(-np.log(hist[t]).mean()))
    return {"ref_ntp_prior": float(np.mean(nll_prior)),
            "ref_ntp_history": float(np.mean(nll_hist))}


@torch.no_grad()
def decode_diagnostics(model: Any, examples: Sequence[Any], targets: Sequence[np.ndarray],
                       tasks: Sequence[str] | None = None, k_prefixes: int = 10, n: int = 10,
                       batch_size: int = 16) -> dict[str, float]:
    """Quick-decode figures of ``model`` (a :class:`~sigmarec.model.sigma.SigmaModel`) on
    prompt-only ``examples`` with their ``targets``; see the module docstring."""
    collate = model.collator()
    items = model.item_vectors()
    codes0 = torch.as_tensor(level0_codes(model.item_prefix.cpu().numpy(), model.codebook_sizes))
    hits, p_hit, in_hit, nll, used = [], [], [], [], []
    for s in range(0, len(examples), batch_size):
        batch = collate(list(examples[s:s + batch_size]), with_labels=False)
        logp, cache = model.prefix_logprobs(PromptBatch.from_collated(batch))
        k = min(k_prefixes, logp.shape[1])
        top_lp, top_c = logp.topk(k, dim=1)
        if model.levels == 1:
            q = model.query_vectors(cache, top_c)  # (B, K, H)
            sims = torch.einsum("bkh,nh->bkn", q.float(), items)
            every = torch.arange(len(items)).expand(sims.shape[0], -1)
            copy = model.item_copy_scores(cache, every)  # repeat-aware models only
            if copy is not None:
                sims = sims + copy[:, None, :]
            same = codes0[None, None, :] == top_c[:, :, None]
            logits = (sims / model.cfg.temperature).masked_fill(~same, -torch.inf)
            within = logits.log_softmax(-1)
            score = (top_lp[:, :, None] + within).amax(dim=1)  # an item lives under one prefix
            top = score.topk(n, dim=1).indices.numpy()
            in_prefix = within.topk(n, dim=2).indices.numpy()  # (B, K, n)
        else:  # multi-level prefixes: only the prefix-head figures
            top = in_prefix = None
        lp = logp.float().numpy()
        tc = top_c.numpy()
        for r, tgt in enumerate(targets[s:s + batch_size]):
            tgt = np.array(tgt, dtype=np.int64)  # a writable copy (parquet arrays are not)
            t_codes = codes0[torch.from_numpy(tgt)].numpy()
            nll.append(float(-lp[r, t_codes].mean()))
            hit_k = np.isin(tc[r], t_codes)
            p_hit.append(bool(hit_k.any()))
            if top is None:
                continue
            hits.append(bool(np.isin(top[r], tgt).any()))
            used.extend(codes0[top[r]].tolist())
            if hit_k.any():
                in_hit.append(bool(np.isin(in_prefix[r][hit_k], tgt).any()))
    out = {"valid_prefix_ntp": float(np.mean(nll)),
           f"prefix_hit@{k_prefixes}": float(np.mean(p_hit))}
    if hits:
        out[f"valid_hr{n}"] = float(np.mean(hits))
        out[f"in_prefix_hit@{n}"] = float(np.mean(in_hit)) if in_hit else 0.0
        out["prefixes_in_top_lists"] = float(len(np.unique(used)))
        if tasks is not None:
            t = np.asarray(tasks)[: len(hits)]
            for name in dict.fromkeys(t.tolist()):
                out[f"valid_hr{n}_{name}"] = float(np.mean(np.asarray(hits)[t == name]))
    return out
