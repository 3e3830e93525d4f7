"""Constrained beam search for the GR baselines: only valid item token sequences can come out.

Public API (the speed benchmark times :func:`gr_recommend` against SIGMA's decoder on the same
prompts)::

    items, scores = gr_recommend(model, {"input_ids": ids, "attention_mask": mask}, num_beams=20)

``model`` is a trained :class:`sigmarec.gr.model.GRModel`; ``ids``/``mask`` are (B, T) LEFT-padded
prompt tensors (``model.collator()(examples, with_labels=False)`` makes them); the call runs
only Hugging Face ``generate`` (beam search, ``num_beams`` beams, ``num_beams`` sequences back,
exactly ``L`` new tokens, length penalty 0 so a score is the sum of the tokens' full-vocabulary
log-probs) plus the mapping back to items. It returns ``items`` (B, K) int64 item indices, best
first, -1 where fewer than K valid distinct items came out, and ``scores`` (B, K) float32
sequence log-probs (-inf for the missing ones). Pass a prebuilt ``trie``
(:meth:`ItemTrie.for_model`) to keep its one-off construction out of a timing.

The constraint is :class:`TrieConstraint`, a batched logits processor: depth 0 uses one fixed
allowed-token mask; deeper steps walk a CSR trie on the device (a ``searchsorted`` per
generated token finds the node, the node's edge range gives the allowed tokens), so a step
costs a few vectorised ops for all B x K beams. :func:`prefix_allowed_tokens_fn` is a plain
Python version for HF's ``prefix_allowed_tokens_fn`` hook, and :func:`score_all_items` a
brute-force reference (every item scored by teacher forcing); the tests check that all three
agree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from sigmarec.gr.model import GRModel
from sigmarec.model.codes import eval_mode
from sigmarec.model.sigma import positions_from_mask


class ItemTrie:
    """Prefix tree over the items' vocabulary-id sequences (n_items, L), held as tensors.

    Depth ``d`` has one node per distinct length-``d`` prefix; its outgoing edges are sorted by
    (node, token) in ``keys[d] = node * V + token``, ``ptr[d]`` is the CSR offset of each node's
    edges, ``tok[d]`` their tokens and ``child[d]`` the node they lead to (at the last depth:
    the leaf = full sequence). ``leaf_ptr``/``leaf_items`` list the items of each leaf in the
    given priority order (one item per leaf when sequences are unique).
    """

    def __init__(self, seqs: np.ndarray, vocab_size: int,
                 priority: np.ndarray | None = None) -> None:
        seqs = np.asarray(seqs, dtype=np.int64)
        n, depth = seqs.shape
        if n == 0:
            raise ValueError("cannot build a trie over an empty catalogue")
        if seqs.min() < 0 or seqs.max() >= vocab_size:
            raise ValueError("item token ids lie outside the vocabulary")
        self.vocab_size, self.depth, self.n_items = int(vocab_size), depth, n
        node = np.zeros(n, dtype=np.int64)  # each item's node at the current depth
        n_nodes = 1
        self.keys, self.ptr, self.tok, self.child = [], [], [], []
        for d in range(depth):
            key = node * vocab_size + seqs[:, d]
            uniq, inverse = np.unique(key, return_inverse=True)
            # Children are numbered in key order, so the next depth's nodes are the edges.
            self.keys.append(uniq)
            self.tok.append(uniq % vocab_size)
            self.child.append(np.arange(len(uniq), dtype=np.int64))
            self.ptr.append(np.searchsorted(uniq // vocab_size, np.arange(n_nodes + 1)))
            node, n_nodes = inverse.ravel().astype(np.int64), len(uniq)
        self.item_leaf = node
        self.n_leaves = n_nodes
        order = np.arange(n) if priority is None else np.asarray(priority, dtype=np.int64)
        if sorted(order.tolist()) != list(range(n)):
            raise ValueError("priority must be a permutation of the item indices")
        by_leaf = order[np.argsort(node[order], kind="stable")]
        self.leaf_items = by_leaf
        self.leaf_ptr = np.searchsorted(node[by_leaf], np.arange(n_nodes + 1))
        self.first_allowed = np.zeros(vocab_size, dtype=bool)
        self.first_allowed[self.tok[0]] = True
        self._device: torch.device | None = None

    @classmethod
    def for_model(cls, model: GRModel, priority: np.ndarray | None = None) -> ItemTrie:
        """The trie of ``model``'s item sequences; ``priority`` orders items of a shared
        sequence (e.g. by training popularity; item index when None)."""
        trie = cls(model.item_seqs.cpu().numpy(), model.vocab_rows, priority)
        return trie.to(model.token_delta.device)

    def to(self, device: torch.device | str) -> ItemTrie:
        """Tensor copies of the tables on ``device`` (used by :class:`TrieConstraint`)."""
        device = torch.device(device)
        if self._device != device:
            t = lambda a: torch.as_tensor(a, device=device)  # noqa: E731
            self.t_keys = [t(k) for k in self.keys]
            self.t_ptr = [t(p) for p in self.ptr]
            self.t_tok = [t(k) for k in self.tok]
            self.t_child = [t(c) for c in self.child]
            self.t_first = t(self.first_allowed)
            self._device = device
        return self

    def nodes(self, generated: torch.Tensor) -> torch.Tensor:
        """Node id after each row's generated tokens (R, s) at depth s; -1 = not a valid path.
        For s = L the node is the leaf (full sequence) id."""
        node = torch.zeros(generated.shape[0], dtype=torch.long, device=generated.device)
        for d in range(min(generated.shape[1], self.depth)):
            key = node * self.vocab_size + generated[:, d]
            keys = self.t_keys[d]
            i = torch.searchsorted(keys, key).clamp(max=len(keys) - 1)
            ok = (node >= 0) & (keys[i] == key)
            node = torch.where(ok, self.t_child[d][i], torch.full_like(node, -1))
        if generated.shape[1] > self.depth:
            node = torch.full_like(node, -1)
        return node

    def allowed(self, generated: torch.Tensor, width: int) -> torch.Tensor:
        """(R, width) bool: the tokens each row may generate next (none after L tokens)."""
        rows, step = generated.shape
        out = torch.zeros(rows, width, dtype=torch.bool, device=generated.device)
        if step == 0:
            out[:, : self.vocab_size] = self.t_first[:width]
            return out
        if step >= self.depth:
            return out
        node = self.nodes(generated)
        ok = node >= 0
        start = torch.where(ok, self.t_ptr[step][node.clamp(min=0)], 0)
        count = torch.where(ok, self.t_ptr[step][node.clamp(min=0) + 1] - start, 0)
        row = torch.repeat_interleave(torch.arange(rows, device=out.device), count)
        offset = torch.arange(len(row), device=out.device) - torch.repeat_interleave(
            torch.cumsum(count, 0) - count, count)
        out[row, self.t_tok[step][torch.repeat_interleave(start, count) + offset]] = True
        return out

    def items_of_leaf(self, leaf: int) -> np.ndarray:
        return self.leaf_items[self.leaf_ptr[leaf]:self.leaf_ptr[leaf + 1]]


class TrieConstraint(LogitsProcessor):
    """Sets every token that does not continue a valid item sequence to -inf (all beams at
    once). ``prompt_len``: columns of the (left-padded) prompt before the generated tokens."""

    def __init__(self, trie: ItemTrie, prompt_len: int) -> None:
        self.trie, self.prompt_len = trie, int(prompt_len)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor
                 ) -> torch.FloatTensor:
        allowed = self.trie.allowed(input_ids[:, self.prompt_len:], scores.shape[-1])
        return scores.masked_fill(~allowed, -torch.inf)


def prefix_allowed_tokens_fn(seqs: np.ndarray, prompt_len: int
                             ) -> Callable[[int, torch.Tensor], list[int]]:
    """The same constraint as a plain Python dict trie for HF's ``prefix_allowed_tokens_fn``
    (slow; a reference for :class:`TrieConstraint`)."""
    root: dict[int, dict] = {}
    for seq in np.asarray(seqs, dtype=np.int64).tolist():
        node = root
        for t in seq:
            node = node.setdefault(t, {})

    def fn(batch_id: int, sent: torch.Tensor) -> list[int]:
        node = root
        for t in sent[prompt_len:].tolist():
            node = node.get(t)
            if node is None:
                return []
        return sorted(node)

    return fn


def generation_config(model: GRModel, num_beams: int) -> GenerationConfig:
    """Explicit settings, so no sampling or penalty default of the model sneaks in."""
    tok = model.tokenizer
    n = model.items.length
    return GenerationConfig(
        num_beams=num_beams, num_return_sequences=num_beams, do_sample=False,
        max_new_tokens=n, min_new_tokens=n, length_penalty=0.0, early_stopping=True,
        repetition_penalty=1.0, no_repeat_ngram_size=0, renormalize_logits=False,
        # output_scores: without it HF drops ``sequences_scores`` (the beam log-probs).
        use_cache=True, return_dict_in_generate=True, output_scores=True,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )


@torch.no_grad()
def gr_recommend(model: GRModel, prompts: Mapping[str, torch.Tensor], num_beams: int,
                 trie: ItemTrie | None = None, constraint: str = "trie",
                 share_prompt: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Top-``num_beams`` items per prompt by constrained beam search; see the module docstring.
    ``constraint="prefix_fn"`` uses :func:`prefix_allowed_tokens_fn` instead (tests).

    ``share_prompt``: run the prompt (all but its last token) once and hand ``generate`` that
    KV cache repeated over the beams, as SIGMA's decoder continues one prompt cache; plain HF
    beam search would encode each prompt once per beam. Same scores either way (tested)."""
    device = model.token_delta.device
    ids = prompts["input_ids"].to(device)
    mask = prompts["attention_mask"].to(device)
    if not bool(mask[:, -1].all()):
        raise ValueError("prompts must be left-padded: the last column must be real tokens")
    trie = (trie or ItemTrie.for_model(model)).to(device)
    bsz, t = ids.shape
    k, n = int(num_beams), model.items.length
    kw: dict = {}
    if constraint == "trie":
        kw["logits_processor"] = LogitsProcessorList([TrieConstraint(trie, t)])
    elif constraint == "prefix_fn":
        kw["prefix_allowed_tokens_fn"] = prefix_allowed_tokens_fn(
            model.item_seqs.cpu().numpy(), t)
    else:
        raise ValueError(f"unknown constraint {constraint!r}; use 'trie' or 'prefix_fn'")
    with eval_mode(model):
        if share_prompt and t > 1:
            kw[model.cache_keyword] = prompt_cache(model, ids[:, :-1], mask[:, :-1], k)
        out = model.backbone.generate(input_ids=ids, attention_mask=mask,
                                      generation_config=generation_config(model, k), **kw)
    gen = out.sequences[:, t:]
    seq_scores = out.sequences_scores.float()
    leaf = trie.nodes(gen) if gen.shape[1] == n else torch.full((len(gen),), -1, device=device)
    # -inf: a beam forced through masked tokens (too few valid sequences); HF fills hypothesis
    # slots that never finished with -1e9.
    valid = torch.isfinite(seq_scores) & (seq_scores > -1e8)
    leaf = torch.where(valid, leaf, torch.full_like(leaf, -1))
    leaf_np = leaf.view(bsz, k).cpu().numpy()
    score_np = seq_scores.view(bsz, k).cpu().numpy()
    items = np.full((bsz, k), -1, dtype=np.int64)
    scores = np.full((bsz, k), -np.inf, dtype=np.float32)
    for b in range(bsz):
        seen: set[int] = set()
        j = 0
        for lf, sc in zip(leaf_np[b], score_np[b], strict=True):
            if lf < 0:
                continue
            # One item per leaf with unique sequences; a shared SID expands into its items.
            for it in trie.items_of_leaf(int(lf)).tolist():
                if j < k and it not in seen:
                    seen.add(it)
                    items[b, j], scores[b, j] = it, sc
                    j += 1
    return items, scores


def prompt_cache(model: GRModel, ids: torch.Tensor, mask: torch.Tensor, repeat: int) -> Any:
    """KV cache of left-padded prompts, each row repeated ``repeat`` times (beam-major)."""
    out = model.backbone(input_ids=ids, attention_mask=mask,
                         position_ids=positions_from_mask(mask), use_cache=True)
    cache = getattr(out, model.cache_keyword)
    cache.batch_repeat_interleave(repeat)
    return cache


@torch.no_grad()
def score_all_items(model: GRModel, prompt_ids: list[int], batch_size: int = 64) -> np.ndarray:
    """Brute-force reference: log P(item's full sequence | prompt) for every item, by teacher
    forcing (full-vocabulary log-softmax, as beam search scores)."""
    collate = model.collator()
    device = model.token_delta.device
    n = model.items.length
    out = []
    with eval_mode(model):
        for s in range(0, model.items.n_items, batch_size):
            idx = range(s, min(s + batch_size, model.items.n_items))
            batch = collate([{"input_ids": prompt_ids, "target_item": i} for i in idx])
            batch = {key: v.to(device) for key, v in batch.items()}
            logits, tgt = model.label_logits(**batch)
            lp = torch.log_softmax(logits, -1).gather(1, tgt[:, None]).view(len(idx), n)
            out.append(lp.sum(1).cpu())
    return torch.cat(out).numpy()
