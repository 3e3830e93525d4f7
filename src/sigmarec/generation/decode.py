"""SIGMA's three-step generation, batched over many requests (SIGMA part 4).

1. One forward pass of each (left-padded) prompt keeps its KV cache and gives the prefix
   distribution; a beam over the prefix levels (a plain top-K for a one-level prefix) keeps K.
2. The K continuations ``<c_k><q>`` run as one batch over the shared cache and give K query
   vectors; each searches only its prefix's items (:class:`~sigmarec.tokenization.prefix_index.
   PrefixIndex`), top-M each, with any business filter (allow mask) inside the search.
3. :func:`~sigmarec.generation.fusion.fuse`: APF and one global sort to the top-N.

Filters never cost list length: prefixes without an eligible item are masked out of the beam,
and a request whose K prefixes hold fewer than N eligible items is given more prefixes (the
next most probable ones), so N items come back whenever N eligible items exist.

:mod:`sigmarec.generation.reference` is the plain, slow version of the same computation (no
cache reuse, exhaustive search) that the tests compare this one with.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from sigmarec.generation.config import Fusion
from sigmarec.generation.fusion import Candidates, fuse
from sigmarec.model.batch import PromptBatch, SFTExample
from sigmarec.model.sigma import PromptCache, SigmaModel
from sigmarec.tokenization.prefix_index import ItemSubsetIndex, make_prefix_index


def build_item_index(model: SigmaModel, backend: str = "faiss") -> ItemSubsetIndex:
    """The prefix-partitioned index over the model's normalised soft tokens ṽ."""
    vecs = model.item_vectors().cpu().numpy().astype(np.float32)
    prefixes = model.item_prefix.cpu().numpy()
    return make_prefix_index(backend, vecs, prefixes, model.n_prefixes)


def eligible_counts(item_prefix: np.ndarray, n_prefixes: int,
                    allow_mask: np.ndarray | None, batch: int) -> np.ndarray:
    """(B, n_prefixes) number of items each request may receive under each flat prefix."""
    if allow_mask is None:
        return np.broadcast_to(np.bincount(item_prefix, minlength=n_prefixes), (batch, n_prefixes))
    mask = np.broadcast_to(np.asarray(allow_mask, dtype=bool), (batch, len(item_prefix)))
    out = np.zeros((batch, n_prefixes), dtype=np.int64)
    for b in range(batch):
        out[b] = np.bincount(item_prefix[mask[b]], minlength=n_prefixes)
    return out


def prefix_beam(model: SigmaModel, cache: PromptCache, width: int,
                counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Step 1: the ``width`` most probable flat prefixes that hold an eligible item.

    Beam search over the prefix levels (exact for one level); partial prefixes whose subtree has
    no eligible item are pruned. Returns (prefixes (B, w), log-probs (B, w)), -1 / -inf padded.
    """
    sizes = model.codebook_sizes
    b = counts.shape[0]
    dev = cache.logprobs.device
    cnt = torch.as_tensor(np.array(counts, dtype=np.int64), device=dev)
    sub = cnt.view(b, sizes[0], -1).sum(-1)
    score = cache.logprobs.double().masked_fill(sub == 0, -torch.inf)
    lp, partial = score.topk(min(width, sizes[0]), dim=1)
    for lv in range(1, len(sizes)):
        step = model.next_level_logprobs(cache, partial.clamp(min=0), lv).double()
        total = lp[:, :, None] + step  # (B, w, C_lv)
        flat = partial[:, :, None] * sizes[lv] + torch.arange(sizes[lv], device=dev)
        sub = cnt.view(b, int(np.prod(sizes[: lv + 1])), -1).sum(-1)
        ok = sub.gather(1, flat.clamp(min=0).view(b, -1)).view_as(flat) > 0
        total = total.masked_fill(~ok | (partial[:, :, None] < 0), -torch.inf)
        lp, idx = total.view(b, -1).topk(min(width, total[0].numel()), dim=1)
        partial = flat.view(b, -1).gather(1, idx)
    partial = partial.masked_fill(~torch.isfinite(lp), -1)
    return partial.cpu().numpy().astype(np.int64), lp.cpu().numpy()


def widths_needed(prefixes: np.ndarray, counts: np.ndarray, m: np.ndarray | int,
                  n: int) -> np.ndarray:
    """Per request, True where its prefixes cannot fill min(N, eligible items) places."""
    held = np.where(prefixes >= 0, np.take_along_axis(counts, prefixes.clip(0), axis=1), 0)
    return np.minimum(held, np.asarray(m).reshape(-1, 1)).sum(1) < np.minimum(n, counts.sum(1))


def union_prefixes(beams: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Per request, the distinct prefixes of several beams (B, w_f) (-1 = padding): the union
    (B, U), -1 padded, and for each beam the (B, w_f) column of each of its slots in the union
    (padding slots point at any column; their results are masked later)."""
    b = beams[0].shape[0]
    rows = [np.unique(np.concatenate([p[r] for p in beams])) for r in range(b)]
    rows = [r[r >= 0] for r in rows]
    width = max(1, max(len(r) for r in rows))
    union = np.full((b, width), -1, dtype=np.int64)
    for r, u in enumerate(rows):
        union[r, :len(u)] = u
    slots = []
    for p in beams:
        where = np.zeros(p.shape, dtype=np.int64)
        for r, u in enumerate(rows):
            if len(u):
                where[r] = np.searchsorted(u, p[r]).clip(max=len(u) - 1)
        slots.append(where)
    return union, slots


class SigmaDecoder:
    """The optimised three-step decoder over a trained :class:`SigmaModel`."""

    def __init__(self, model: SigmaModel, k_prefixes: int, m_per_prefix: int,
                 index: ItemSubsetIndex | None = None, index_backend: str = "faiss") -> None:
        if k_prefixes < 1 or m_per_prefix < 1:
            raise ValueError(f"K ({k_prefixes}) and M ({m_per_prefix}) must be positive")
        self.model = model.eval()
        self.k = int(k_prefixes)
        self.m = int(m_per_prefix)
        self.index = index if index is not None else build_item_index(model, index_backend)
        self.item_prefix = model.item_prefix.cpu().numpy()
        self.collate = model.collator()

    def batch(self, examples: Sequence[SFTExample]) -> PromptBatch:
        """The left-padded prompts of ``examples`` on the model's device."""
        dev = self.model.item_prefix.device
        return PromptBatch.from_collated(self.collate(list(examples), with_labels=False)).to(dev)

    @torch.no_grad()
    def candidates(self, batch: PromptBatch, n: int,
                   allow_mask: np.ndarray | None = None) -> Candidates:
        """Steps 1 and 2 for a collated batch; ``allow_mask`` None, (n_items,) or (B, n_items)."""
        return self.candidates_multi(batch, n, [allow_mask])[0]

    @torch.no_grad()
    def candidates_multi(self, batch: PromptBatch, n: int,
                         allow_masks: Sequence[np.ndarray | None]) -> list[Candidates]:
        """Steps 1 and 2 under several filters (e.g. none and a business rule). The prompt
        forward runs once; each filter has its own beam over the same KV cache (which the
        continuations leave unchanged); the continuations, the other expensive part, run once
        for the union of the filters' prefixes, since a query vector depends only on the prompt
        and its prefix, never on the filter."""
        _, cache = self.model.prefix_logprobs(batch)
        return self.candidates_from_cache(cache, batch.input_ids.shape[0], n, allow_masks)

    @torch.no_grad()
    def candidates_from_cache(self, cache: PromptCache, bsz: int, n: int,
                              allow_masks: Sequence[np.ndarray | None]) -> list[Candidates]:
        """Steps 1 and 2 from a prompt cache already computed (e.g. one reused across a
        user's updates by the nearline job), one Candidates per filter."""
        beams = [self._beam(cache, bsz, n, mask) for mask in allow_masks]
        union, slots = union_prefixes([p for p, _, _ in beams])
        q_all = self.model.query_vectors(
            cache, torch.as_tensor(union.clip(0), device=cache.logprobs.device))
        q_all = q_all.float().cpu().numpy()
        out = []
        for (prefixes, logp, m), where, mask in zip(beams, slots, allow_masks, strict=True):
            q = np.take_along_axis(q_all, where[:, :, None], axis=1)
            out.append(self._search(cache, q, prefixes, logp, m, mask))
        return out

    def _beam(self, cache: PromptCache, bsz: int, n: int, allow_mask: np.ndarray | None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Step 1 under one filter: (prefixes (B, w), log-probs (B, w), M per request)."""
        model = self.model
        counts = eligible_counts(self.item_prefix, model.n_prefixes, allow_mask, bsz)
        m = np.full(bsz, self.m)
        prefixes, logp = prefix_beam(model, cache, self.k, counts)
        width = self.k
        # Rare (restrictive filters): widen the beam for the requests that need it, and when
        # every prefix is in and the eligible items sit unevenly, take up to N from each.
        while (need := widths_needed(prefixes, counts, m, n)).any():
            if width >= model.n_prefixes:
                m[need] = max(self.m, n)
                break
            width = min(width * 2, model.n_prefixes)
            wide_p, wide_lp = prefix_beam(model, cache, width, counts)
            pad = width - prefixes.shape[1]
            prefixes = np.pad(prefixes, ((0, 0), (0, pad)), constant_values=-1)
            logp = np.pad(logp, ((0, 0), (0, pad)), constant_values=-np.inf)
            prefixes[need], logp[need] = wide_p[need], wide_lp[need]
        return prefixes, logp, m

    def _search(self, cache: PromptCache, q: np.ndarray, prefixes: np.ndarray,
                logp: np.ndarray, m: np.ndarray, allow_mask: np.ndarray | None) -> Candidates:
        """Step 2's search under one filter, from the query vectors of its prefixes."""
        cos, items = self.index.search_multi(q, prefixes, int(m.max()), allow_mask=allow_mask)
        copy = None
        if cache.slots is not None:
            cos, items, copy = self._with_prompt_items(cache, q, prefixes, cos, items, allow_mask)
        beyond = np.arange(items.shape[2])[None, None, :] >= m[:, None, None]
        items[np.broadcast_to(beyond, items.shape)] = -1
        cos[np.broadcast_to(beyond, cos.shape)] = -np.inf
        if copy is not None:
            copy = np.where(np.isfinite(cos), copy, 0.0).astype(np.float64)
        return Candidates(prefixes=prefixes, prefix_logp=logp, items=items,
                          cosine=cos.astype(np.float64), k_for_spread=self.k, copy=copy)

    def _with_prompt_items(self, cache: PromptCache, q: np.ndarray, prefixes: np.ndarray,
                           cos: np.ndarray, items: np.ndarray, allow_mask: np.ndarray | None
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Repeat-aware models: scores are cosine plus the copy term, which only the prompt's
        own items (and the household's counted items, the instruction's matched items) have.
        The search returned the top-M by cosine; adding every eligible such item of each kept
        prefix, scored with its copy term, and keeping the top M of the union is exact (any
        other item's score is its cosine, below the M found). Returns (scores, items, the copy term
        of each score)."""
        extra = cache.slots.listed_items().cpu().numpy()  # (B, J)
        b, j = extra.shape
        ok = extra >= 0
        if allow_mask is not None:
            allow = np.broadcast_to(np.asarray(allow_mask, dtype=bool), (b, len(self.item_prefix)))
            ok &= np.take_along_axis(allow, extra.clip(0), axis=1)
        first = np.zeros_like(ok)
        for r in range(b):
            _, idx = np.unique(extra[r], return_index=True)
            first[r, idx] = True
        vecs = self.model.item_vectors(extra.clip(0).reshape(-1)).numpy().reshape(b, j, -1)
        bias = self.model.item_copy_scores(cache, torch.as_tensor(extra, device=cache.logprobs
                                                                  .device))
        bias = bias.float().cpu().numpy()
        in_beam = ((self.item_prefix[extra.clip(0)][:, None, :] == prefixes[:, :, None])
                   & (ok & first)[:, None, :] & (prefixes >= 0)[:, :, None])  # (B, K, J)
        score_e = np.where(in_beam, np.einsum("bkh,bjh->bkj", q, vecs) + bias[:, None, :],
                           -np.inf)
        items_e = np.where(in_beam, extra[:, None, :], -1)
        # Prompt items the search found come back from the prompt side, with their copy term.
        found = ((items[..., None] == extra[:, None, None, :]) & (extra >= 0)[:, None, None, :]
                 ).any(-1) & (items >= 0)
        all_items = np.concatenate([np.where(found, -1, items), items_e], axis=2)
        all_score = np.concatenate([np.where(found, -np.inf, cos), score_e], axis=2)
        all_copy = np.concatenate([np.zeros_like(cos), np.broadcast_to(
            bias[:, None, :], score_e.shape)], axis=2)
        order = np.argsort(-all_score, axis=2, kind="stable")[:, :, : items.shape[2]]
        items = np.take_along_axis(all_items, order, axis=2)
        cos = np.take_along_axis(all_score, order, axis=2)
        copy = np.take_along_axis(all_copy, order, axis=2)
        items[~np.isfinite(cos)] = -1
        return cos, items, copy

    def recommend(self, examples: Sequence[SFTExample], n: int, fusion: Fusion = "adaptive",
                  tau: float = 1.0, allow_mask: np.ndarray | None = None,
                  copy_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """Top-``n`` items and scores (B, n) for the prompts of ``examples``."""
        cands = self.candidates(self.batch(examples), n, allow_mask)
        return fuse(cands, fusion, tau, n, copy_scale)

