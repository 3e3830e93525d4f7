"""Prompt KV-cache reuse for the nearline job: re-encode only the part of a prompt that changed.

Generation step 1 (``SigmaModel.prefix_logprobs``) runs the backbone over the whole prompt and
keeps its keys and values. When a user's prompt is rebuilt after new events, its first ``p``
tokens are often the same as last time; their keys and values are then the same too (a causal
model's state at a position depends only on the tokens up to it). So the job keeps, per
(user, task), the prompt's *token keys* and its per-layer KV, finds the longest common prefix
with the new prompt, crops the cached KV to it and runs the backbone over the new suffix only.

* Token keys are the token ids with every item placeholder replaced by ``-(item + 1)``: two
  placeholders are the same token only when they carry the same item's soft embedding.
* Prompts of one batch have different cached and new lengths. The batch's KV is laid out as
  ``[cached prefix, left-padded to P | new suffix, left-padded to S]`` under a 2D attention
  mask with holes and position ids counted over real tokens only, so every row sees exactly its
  own tokens at their own positions; the result is a :class:`PromptCache` the decoder continues
  as if the prompt had been encoded in one pass.
* At least the last token is always re-run: its hidden state gives the prefix distribution.
* The lookup takes the best entry of the user across tasks: prompts of different tasks differ
  only in the request line at the end, so one task's fresh KV serves the next task's prompt.

Entries live on disk (``<run>/serving/kv/<model fingerprint>/<user_idx>/<task>.safetensors``,
written by rename, so a killed job leaves no torn file), because every ``sigma nearline`` is a new
process; the fingerprint covers the trained weights and backbone, so a retrained model never
reads stale states. Oldest-used entries are evicted beyond ``serving.nearline.kv_cache_max_mb``.

Only a plain ``DynamicCache`` (full attention in every layer) can be cropped and re-assembled;
other cache types (sliding-window layers, recurrent states) fall back to a full forward.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sigmarec.core.atomic import atomic_path
from sigmarec.model.batch import PromptBatch, SFTExample, left_pad
from sigmarec.model.sigma import PromptCache, SigmaModel, positions_from_mask

log = logging.getLogger("sigmarec")

FORMAT = 1


@dataclass
class PromptKV:
    """One prompt's token keys (T,) and per-layer (keys, values), each (heads, T, head_dim)."""

    keys: np.ndarray
    layers: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def length(self) -> int:
        return int(len(self.keys))

    @property
    def nbytes(self) -> int:
        return int(sum(k.numel() * k.element_size() + v.numel() * v.element_size()
                       for k, v in self.layers) + self.keys.nbytes)


@dataclass
class ReuseStats:
    """Token counts of prompt forwards: ``reused`` came from the cache, ``computed`` ran."""

    prompts: int = 0
    tokens: int = 0
    reused: int = 0
    hits: int = 0  # prompts that reused at least one token
    by_cut: dict[str, int] = field(default_factory=dict)  # where reuse stopped, by section

    @property
    def computed(self) -> int:
        return self.tokens - self.reused

    def add(self, other: ReuseStats) -> None:
        self.prompts += other.prompts
        self.tokens += other.tokens
        self.reused += other.reused
        self.hits += other.hits
        for k, v in other.by_cut.items():
            self.by_cut[k] = self.by_cut.get(k, 0) + v

    def as_dict(self) -> dict[str, Any]:
        return {"prompts": self.prompts, "tokens": self.tokens, "reused_tokens": self.reused,
                "computed_tokens": self.computed, "prompts_with_reuse": self.hits,
                "reused_share": round(self.reused / max(self.tokens, 1), 4),
                "reuse_ends_in": dict(sorted(self.by_cut.items()))}


def token_keys(example: SFTExample, item_token_id: int) -> np.ndarray:
    """The prompt's token ids with each placeholder written as ``-(item + 1)``."""
    ids = np.asarray(example.input_ids, dtype=np.int64).copy()
    slots = np.flatnonzero(ids == item_token_id)
    if len(slots) != len(example.item_ids):
        raise ValueError(f"{len(slots)} placeholders but {len(example.item_ids)} item ids")
    ids[slots] = -(np.asarray(example.item_ids, dtype=np.int64) + 1)
    return ids


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


def reusable(kv: Any) -> bool:
    """Whether a backbone cache can be split into rows, cropped and re-assembled."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    layers = getattr(kv, "layers", None)
    return (type(kv) is DynamicCache and bool(layers)
            and all(type(layer) is DynamicLayer for layer in layers))


def split_rows(kv: Any, attention_mask: torch.Tensor, keys: Sequence[np.ndarray]
               ) -> list[PromptKV]:
    """Per row, the KV of its real (unmasked) columns, copied out of the batch."""
    out = []
    for r, k in enumerate(keys):
        cols = attention_mask[r].bool()
        if int(cols.sum()) != len(k):
            raise AssertionError(f"row {r}: {int(cols.sum())} real tokens, {len(k)} keys")
        out.append(PromptKV(np.asarray(k, dtype=np.int64), [
            (layer.keys[r][:, cols].detach().clone(), layer.values[r][:, cols].detach().clone())
            for layer in kv.layers]))
    return out


def prompt_forward(model: SigmaModel, batch: PromptBatch,
                   examples: Sequence[SFTExample], cached: Sequence[PromptKV | None] | None,
                   ) -> tuple[PromptCache, list[PromptKV] | None, ReuseStats]:
    """Generation step 1 for the collated ``batch`` of ``examples``, reusing ``cached`` KV.

    Returns the :class:`PromptCache` (what ``prefix_logprobs`` returns), each prompt's new
    :class:`PromptKV` to store (None when the backbone's cache cannot be reused) and the
    reuse counts (with the prompt section in which each prompt's reuse stopped).
    """
    keys = [token_keys(e, model.item_token_id) for e in examples]
    stats = ReuseStats(prompts=len(examples), tokens=int(sum(len(k) for k in keys)))
    cached = list(cached) if cached is not None else [None] * len(examples)
    reuse = [0 if c is None else min(common_prefix(k, c.keys), len(k) - 1)
             for k, c in zip(keys, cached, strict=True)]
    for ex, p, c in zip(examples, reuse, cached, strict=True):
        name = "no entry" if c is None else _section(ex, p, model.item_token_id, model.levels)
        stats.by_cut[name] = stats.by_cut.get(name, 0) + 1
    if not any(reuse):
        _, cache = _from_scratch(model, batch)
        rows = split_rows(cache.past_key_values, cache.attention_mask, keys) if reusable(
            cache.past_key_values) else None
        return cache, rows, stats
    stats.reused = int(sum(reuse))
    stats.hits = int(sum(p > 0 for p in reuse))
    cache = _incremental(model, batch, examples, cached, reuse)
    return cache, split_rows(cache.past_key_values, cache.attention_mask, keys), stats


def _section(ex: SFTExample, p: int, item_token_id: int, levels: int) -> str:
    """The prompt section (as ``render_prompt`` lays it out) that holds token ``p``."""
    if p >= len(ex.input_ids) - 1:
        return "unchanged prompt"
    slots = [i for i, t in enumerate(ex.input_ids) if t == item_token_id]
    n_ctx = int(ex.n_context or 0)
    # An item is written as its prefix tokens then the placeholder.
    if n_ctx and p < slots[0] - levels:
        return "header"
    if n_ctx and p <= slots[n_ctx - 1]:
        return "bought most often"
    hist = slots[n_ctx:]
    if not hist or p < hist[0] - levels:
        return "header" if not n_ctx else "bought most often"
    return "recently bought" if p <= hist[-1] else "request"


def _from_scratch(model: SigmaModel, batch: PromptBatch) -> tuple[torch.Tensor, PromptCache]:
    return model.prefix_logprobs(batch)


@torch.no_grad()
def _incremental(model: SigmaModel, batch: PromptBatch,
                 examples: Sequence[SFTExample], cached: Sequence[PromptKV | None],
                 reuse: Sequence[int]) -> PromptCache:
    from transformers.cache_utils import DynamicCache

    dev = batch.input_ids.device
    bsz = len(examples)
    width = max(reuse)
    ref = next(c for c, p in zip(cached, reuse, strict=True) if p > 0).layers
    past_mask = torch.zeros((bsz, width), dtype=torch.long, device=dev)
    past = [(torch.zeros((bsz, *k.shape[:-2], width, k.shape[-1]), dtype=k.dtype, device=dev),
             torch.zeros((bsz, *v.shape[:-2], width, v.shape[-1]), dtype=v.dtype, device=dev))
            for k, v in ref]
    suffix_ids, suffix_items = [], []
    for r, (ex, c, p) in enumerate(zip(examples, cached, reuse, strict=True)):
        ids = list(ex.input_ids)
        if p:
            past_mask[r, width - p:] = 1
            for (pk, pv), (ck, cv) in zip(past, c.layers, strict=True):
                pk[r, ..., width - p:, :] = ck[..., :p, :].to(dev)
                pv[r, ..., width - p:, :] = cv[..., :p, :].to(dev)
        before = sum(t == model.item_token_id for t in ids[:p])
        suffix_ids.append(ids[p:])
        suffix_items.extend(ex.item_ids[before:])
    new_ids, new_mask = left_pad(suffix_ids, int(model.tokenizer.pad_token_id))
    new_ids, new_mask = new_ids.to(dev), new_mask.to(dev)
    mask = torch.cat([past_mask, new_mask], dim=1)
    pos = positions_from_mask(mask)[:, width:]
    items = torch.tensor(suffix_items, dtype=torch.long, device=dev)
    was = model.training
    model.eval()
    try:
        uniq, inverse = torch.unique(items, return_inverse=True)
        soft = model.item_embeddings(uniq)[inverse] if len(items) else torch.zeros(
            0, model.hidden, device=dev)
        embeds = model.inputs_embeds(new_ids, new_mask, soft)
        kv = DynamicCache(ddp_cache_data=past)
        h, kv = model.decode(embeds, mask, pos, cache=kv, use_cache=True)
        return model.prompt_cache(h[:, -1], kv, mask, pos[:, -1] + 1, batch)
    finally:
        model.train(was)


# ------------------------------------------------------------------------------- storage


def model_fingerprint(model_dir: Path, backbone: Any) -> str:
    """Changes whenever the trained weights or the backbone do (then every entry is stale)."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(model_dir)):
        path = Path(model_dir) / name
        if path.is_file():
            h.update(name.encode())
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    dump = backbone.model_dump(mode="json") if hasattr(backbone, "model_dump") else backbone
    h.update(json.dumps(dump, sort_keys=True, default=str).encode())
    h.update(f"format{FORMAT}".encode())
    return h.hexdigest()[:16]


class KVCacheStore:
    """The on-disk entries of one model (see the module docstring)."""

    def __init__(self, root: Path, fingerprint: str, max_bytes: int) -> None:
        self.root = Path(root)
        self.dir = self.root / fingerprint
        self.max_bytes = int(max_bytes)
        self.dir.mkdir(parents=True, exist_ok=True)
        for other in self.root.iterdir():
            # Another model's states can never be read again.
            if other.is_dir() and other.name != fingerprint:
                shutil.rmtree(other, ignore_errors=True)
        self._sizes: dict[Path, int] = {}
        for user in self.dir.iterdir():
            for f in user.iterdir() if user.is_dir() else ():
                if f.name.endswith(".tmp"):  # left by a killed job before its rename
                    f.unlink(missing_ok=True)
                elif f.suffix == ".safetensors":
                    self._sizes[f] = f.stat().st_size

    @property
    def nbytes(self) -> int:
        return int(sum(self._sizes.values()))

    def __len__(self) -> int:
        return len(self._sizes)

    def _path(self, user_idx: int, task: str) -> Path:
        return self.dir / str(int(user_idx)) / f"{task}.safetensors"

    def best(self, user_idx: int, keys: np.ndarray) -> PromptKV | None:
        """The user's entry (any task) sharing the longest token prefix with ``keys``."""
        from safetensors import safe_open

        folder = self.dir / str(int(user_idx))
        if not folder.is_dir():
            return None
        best_path, best_len = None, 0
        for f in sorted(folder.glob("*.safetensors")):
            try:
                with safe_open(str(f), framework="pt") as fh:
                    n = common_prefix(keys, fh.get_tensor("keys").numpy())
            except (OSError, ValueError, RuntimeError) as e:
                log.warning("nearline: unreadable KV entry %s (%s); dropped", f, e)
                self._drop(f)
                continue
            if n > best_len:
                best_path, best_len = f, n
        return self._load(best_path) if best_path is not None else None

    def _load(self, path: Path) -> PromptKV | None:
        from safetensors.torch import load_file

        try:
            t = load_file(str(path))
            n = sum(1 for k in t if k.startswith("k."))
            entry = PromptKV(t["keys"].numpy(), [(t[f"k.{i}"], t[f"v.{i}"]) for i in range(n)])
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            log.warning("nearline: unreadable KV entry %s (%s); dropped", path, e)
            self._drop(path)
            return None
        os.utime(path)  # recently used: evicted last
        return entry

    def put(self, user_idx: int, task: str, entry: PromptKV) -> None:
        from safetensors.torch import save_file

        path = self._path(user_idx, task)
        tensors = {"keys": torch.from_numpy(np.ascontiguousarray(entry.keys))}
        for i, (k, v) in enumerate(entry.layers):
            tensors[f"k.{i}"], tensors[f"v.{i}"] = k.contiguous().cpu(), v.contiguous().cpu()
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp))
        self._sizes[path] = path.stat().st_size
        self._evict()

    def _drop(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        self._sizes.pop(path, None)

    def _evict(self) -> None:
        if self.nbytes <= self.max_bytes:
            return
        by_age = sorted(self._sizes, key=lambda p: p.stat().st_mtime if p.exists() else 0)
        while self.nbytes > self.max_bytes and by_age:
            self._drop(by_age.pop(0))


def kv_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "serving" / "kv"
