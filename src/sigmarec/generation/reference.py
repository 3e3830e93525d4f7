"""The plain reference of SIGMA's three-step generation: slow, obvious, for checking.

One request at a time, no padding, no KV cache: every prefix probability and every query vector
comes from a fresh forward pass of the whole prompt plus the continuation tokens; the search is
a masked dot product with every item; APF is written out per prefix. It implements the same
definition as :class:`~sigmarec.generation.decode.SigmaDecoder` (prefix beam restricted to
prefixes holding an eligible item, widened until N eligible items are reachable) so the two must
return the same lists.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as F

from sigmarec.generation.config import Fusion
from sigmarec.generation.fusion import OFF_GAP
from sigmarec.model.batch import PromptBatch, SFTExample
from sigmarec.model.sigma import SigmaModel
from sigmarec.tasks.channels import collated_channels
from sigmarec.tokenization.hybrid import flat_to_codes


@torch.no_grad()
def _last_hidden(model: SigmaModel, ex: SFTExample, extra: list[int]) -> torch.Tensor:
    dev = model.item_prefix.device
    ids = torch.tensor([list(ex.input_ids) + extra], device=dev)
    mask = torch.ones_like(ids)
    items = torch.tensor(list(ex.item_ids), dtype=torch.long, device=dev)
    model.eval()
    return model(ids, mask, items)["hidden"][0, -1]


def _prefix_tokens(model: SigmaModel, flat: int, levels: int) -> list[int]:
    codes = flat_to_codes(np.array([flat]), model.codebook_sizes)[0]
    return [int(model.level_token_ids[lv][codes[lv]]) for lv in range(levels)]


class _Copy:
    """A repeat-aware model's copy term for one request: its prompt's item table and gates
    (read at the last prompt token), or nothing for a model without it."""

    def __init__(self, model: SigmaModel, ex: SFTExample) -> None:
        self.model, self.slots, self.gates = model, None, None
        if model.repeat is None:
            return
        dev = model.item_prefix.device
        ids = torch.tensor([list(ex.input_ids)], device=dev)
        n_ctx = int(ex.n_context or 0)
        seq = torch.tensor([False] * n_ctx + [True] * (len(ex.item_ids) - n_ctx), device=dev)
        lists = {}
        for ch in collated_channels():
            items, values = ex.lists.get(ch.name, ((), ()))
            lists[ch.name] = (torch.tensor([list(items)], dtype=torch.long, device=dev),
                              torch.tensor([list(values)], dtype=torch.float32, device=dev))
        task = (torch.tensor([int(ex.task_id)], device=dev) if model.cfg.task_gates
                else None)
        self.slots = model.prompt_slots(PromptBatch(
            ids, torch.ones_like(ids), torch.tensor(list(ex.item_ids), dtype=torch.long,
                                                    device=dev), seq, lists, task))
        self.gates = model.repeat(_last_hidden(model, ex, [])[None], task)

    def prefix(self, level: int, partial: int) -> torch.Tensor | None:
        codes = torch.tensor(flat_to_codes(np.array([partial]), self.model.codebook_sizes[
            :level]) if level else np.zeros((1, 0), dtype=np.int64), device=self.model
            .item_prefix.device)
        return self.model.copy_bias(self.gates, self.slots, level, codes)

    def items(self, members: np.ndarray) -> np.ndarray:
        if self.slots is None:
            return np.zeros(len(members))
        idx = torch.as_tensor(members[None], device=self.model.item_prefix.device)
        return self.model.item_copy_bias(self.gates, self.slots, idx)[0].double().cpu().numpy()


@torch.no_grad()
def _level_logprobs(model: SigmaModel, ex: SFTExample, tokens: list[int], level: int,
                    bias: torch.Tensor | None = None) -> np.ndarray:
    h = _last_hidden(model, ex, tokens)
    return F.log_softmax(model.level_logits(h[None], level, copy=bias), dim=-1)[0].double(
    ).cpu().numpy()


@torch.no_grad()
def reference_recommend(model: SigmaModel, ex: SFTExample, k: int, m: int, n: int,
                        fusion: Fusion, tau: float,
                        allow: np.ndarray | None = None) -> tuple[list[int], list[float]]:
    """Top-``n`` (items, scores) of one request, computed the slow way."""
    sizes = model.codebook_sizes
    prefix_of = model.item_prefix.cpu().numpy()
    allow = np.ones(len(prefix_of), dtype=bool) if allow is None else np.asarray(allow, bool)
    counts = np.bincount(prefix_of[allow], minlength=model.n_prefixes)
    copy = _Copy(model, ex)

    def beam(width: int) -> list[tuple[float, int]]:
        # Level by level: (log-prob, flat partial prefix); prune subtrees without eligible items.
        beams = [(0.0, 0)]
        for lv in range(len(sizes)):
            below = int(np.prod(sizes[lv + 1:]))
            grown = []
            for lp, part in beams:
                base = _prefix_tokens_partial(model, part, lv)
                step = _level_logprobs(model, ex, base, lv, copy.prefix(lv, part))
                for c in range(sizes[lv]):
                    flat = part * sizes[lv] + c
                    if counts[flat * below:(flat + 1) * below].sum() > 0:
                        grown.append((lp + step[c], flat))
            grown.sort(key=lambda t: -t[0])
            beams = grown[:width]
        return beams

    width = k
    chosen = beam(width)
    while sum(min(counts[p], m) for _, p in chosen) < min(n, counts.sum()):
        if width >= model.n_prefixes:
            m = max(m, n)  # every prefix is in: let each give up to N
            break
        width = min(width * 2, model.n_prefixes)
        chosen = beam(width)

    items_v = model.item_vectors().double().cpu().numpy()
    probs = [math.exp(lp) for lp, _ in chosen[:k]]
    mean = sum(probs) / len(probs) if probs else 0.0
    spread = math.sqrt(sum((p - mean) ** 2 for p in probs) / len(probs)) if probs else 0.0
    scale = {"adaptive": spread / tau, "fixed": 1.0 / tau, "joint": 1.0 / tau, "off": 0.0}[fusion]

    cands: list[tuple[float, int]] = []
    for rank, (lp, flat) in enumerate(chosen):
        h = _last_hidden(model, ex, _prefix_tokens(model, flat, len(sizes)) +
                         [model.query_token_id])
        q = model.query_from_hidden(h[None])[0].double().cpu().numpy()
        members = np.flatnonzero((prefix_of == flat) & allow)
        # Scores: cosine, plus the copy term of a repeat-aware model.
        cos = items_v[members] @ q + copy.items(members)
        order = np.argsort(-cos, kind="stable")[:m]
        top, top_cos = members[order], cos[order]
        if fusion == "off":
            cands += [(-rank * OFF_GAP + float(c), int(i)) for c, i in zip(top_cos, top,
                                                                          strict=True)]
            continue
        z = [c * scale for c in top_cos]
        if fusion == "joint":  # no normalisation within the prefix
            cands += [(lp + v, int(i)) for v, i in zip(z, top, strict=True)]
            continue
        hi = max(z)
        lse = hi + math.log(sum(math.exp(v - hi) for v in z))
        cands += [(lp + v - lse, int(i)) for v, i in zip(z, top, strict=True)]
    cands.sort(key=lambda t: -t[0])
    return [i for _, i in cands[:n]], [s for s, _ in cands[:n]]


def _prefix_tokens_partial(model: SigmaModel, partial: int, levels: int) -> list[int]:
    if levels == 0:
        return []
    codes = flat_to_codes(np.array([partial]), model.codebook_sizes[:levels])[0]
    return [int(model.level_token_ids[lv][codes[lv]]) for lv in range(levels)]
