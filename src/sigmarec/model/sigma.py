"""The SIGMA recommender: an LLM that reads hybrid item tokens and answers with a prefix + <q>.

``SigmaModel`` wraps any Hugging Face causal LM:

* the vocabulary gains the prefix tokens (``<a_k>``, one per code of each prefix level), the query
  token ``<q>`` and the placeholder ``<|item|>``;
* each item's soft token ``ṽ = ProjFuse(v_ID, v_text[, v_img])`` (frozen features held as
  buffers, ProjFuse trainable) replaces the embedding of the placeholder that follows the item's
  prefix in the prompt, through ``inputs_embeds``;
* a projection head maps the final hidden state at ``<q>`` to a query vector compared with ``ṽ``
  by cosine.

Losses (SIGMA part 3): ``L_NTP``, cross-entropy of each label prefix token at the position before
it, over that prefix level's tokens only (exactly the softmax generation step 1 takes), plus
``λ · L_InfoNCE`` between the normalised query vector and the target's ``ṽ``, against hard
negatives that share the target's prefix and the other in-batch targets.

Why the new token rows are separate parameters (``token_delta``, and ``head_delta`` for untied
output embeddings) added to the frozen rows instead of unfreezing the embedding matrix: the
optimizer then holds state for a few hundred rows instead of the whole vocabulary, weight decay
never touches other rows, and FSDP/DeepSpeed see an ordinary small parameter. The rows start at
zero, so the model starts out exactly as ``add_special_tokens`` initialised it.

The loss heads read the decoder's last hidden state directly, never the LM head: only the
prefix rows of the output matrix are needed, which saves a (tokens x vocabulary) matmul.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from sigmarec.backbone.loading import add_special_tokens
from sigmarec.model.adapt import adapt_backbone, cache_keyword
from sigmarec.model.batch import GATE_TASKS, SigmaCollator
from sigmarec.model.config import ModelConfig
from sigmarec.model.repeat import (
    PromptSlots,
    RepeatGate,
    column_counts,
    item_bias,
    item_counts,
    n_gates,
    prefix_bias,
    prefix_counts,
)
from sigmarec.tokenization.hybrid import HybridVocab, ProjFuse
from sigmarec.tokenization.hybrid import flat_to_codes as _codes_tensor  # on the device

if TYPE_CHECKING:
    from sigmarec.backbone.config import BackboneConfig

WEIGHTS_FILE = "sigma_trainable.safetensors"
META_FILE = "sigma_model.json"


@dataclass
class PromptCache:
    """What :meth:`SigmaModel.prefix_logprobs` keeps of a batch of prompts for continuing them.

    ``past_key_values`` is the backbone's KV cache (never modified by ``query_vectors``),
    ``attention_mask`` the prompts' (B, T) mask, ``next_position`` the position id of the first
    continuation token of each row, ``logprobs`` the (B, codes of level 1) prefix log-probs.
    """

    past_key_values: Any
    attention_mask: torch.Tensor
    next_position: torch.Tensor
    logprobs: torch.Tensor
    # Repeat-aware models (``cfg.repeat_aware``): the prompts' item table and copy gates.
    slots: PromptSlots | None = None
    repeat_gates: torch.Tensor | None = None


PROMPT_FIELDS = ("input_ids", "attention_mask", "item_ids", "sequence_mask", "count_items",
                 "count_values", "match_items", "match_values", "novel_items", "novel_values",
                 "task_ids")


def prompt_args(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The prompt fields of a collated batch, as :meth:`SigmaModel.prefix_logprobs` and
    :meth:`SigmaModel.prompt_cache` take them (absent optional fields are None)."""
    return {k: batch.get(k) for k in PROMPT_FIELDS}


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only real tokens, so left padding does not shift positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class _Head(nn.Module):
    """hidden -> hidden projection of the <q> state. Starts as the identity: the query begins
    as the LLM's own representation and training learns the correction."""

    def __init__(self, hidden: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.proj = nn.Linear(hidden, hidden)
        with torch.no_grad():
            if kind == "linear":
                self.proj.weight.copy_(torch.eye(hidden))
                self.proj.bias.zero_()
            else:
                self.out = nn.Linear(hidden, hidden)
                self.out.weight.zero_()
                self.out.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return self.proj(h)
        return h + self.out(F.gelu(self.proj(h)))


class SigmaModel(nn.Module):
    """The SFT model; see the module docstring. Build it before wrapping with accelerate."""

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer: Any,
        vocab: HybridVocab,
        item_features: Mapping[str, np.ndarray | torch.Tensor],
        item_prefix: np.ndarray | torch.Tensor,
        cfg: ModelConfig | None = None,
    ) -> None:
        super().__init__()
        cfg = cfg or ModelConfig()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.vocab = vocab
        feats = {s: torch.as_tensor(np.asarray(f), dtype=torch.float32)
                 for s, f in item_features.items()}
        if not feats:
            raise ValueError("item_features needs at least one source (e.g. 'id', 'text')")
        sizes = {s: tuple(f.shape) for s, f in feats.items()}
        if any(len(sh) != 2 for sh in sizes.values()) or len({sh[0] for sh in sizes.values()}) > 1:
            raise ValueError(f"item features must be (n_items, d) with one n_items, got {sizes}")
        self.n_items = next(iter(feats.values())).shape[0]
        prefix = torch.as_tensor(np.asarray(item_prefix), dtype=torch.long)
        if prefix.shape != (self.n_items,):
            raise ValueError(f"item_prefix must have shape ({self.n_items},), got {prefix.shape}")
        if len(prefix) and (prefix.min() < 0 or prefix.max() >= vocab.n_prefixes):
            raise ValueError(f"item_prefix values must lie in 0..{vocab.n_prefixes - 1}")

        text_cfg = _text_config(backbone)
        self.hidden = int(text_cfg.hidden_size)
        self.logit_softcap = getattr(text_cfg, "final_logit_softcapping", None)
        # Measured before the new rows exist: the soft tokens are scaled to look like tokens.
        target_norm = _typical_embedding_norm(backbone, len(tokenizer))
        self.token_norm = target_norm

        self.codebook_sizes = [int(k) for k in vocab.codebook_sizes]
        n_prefix_tokens = len(vocab.prefix_tokens)
        ids = add_special_tokens(
            backbone, tokenizer, [*vocab.prefix_tokens, vocab.query_token, cfg.item_token]
        )
        if len(set(ids)) != len(ids):
            raise ValueError("prefix, query and item tokens must all be distinct")
        self.prefix_token_ids = ids[:n_prefix_tokens]
        self.query_token_id = ids[n_prefix_tokens]
        self.item_token_id = ids[n_prefix_tokens + 1]
        offsets = np.concatenate([[0], np.cumsum(self.codebook_sizes)]).astype(int)
        self.level_offsets = offsets.tolist()
        self.level_token_ids = [self.prefix_token_ids[offsets[i]:offsets[i + 1]]
                                for i in range(len(self.codebook_sizes))]

        inp = backbone.get_input_embeddings()
        out = backbone.get_output_embeddings()
        self.tied = out is None or out.weight.data_ptr() == inp.weight.data_ptr()

        backbone = adapt_backbone(backbone, cfg)
        self.backbone = backbone
        self._cache_kw = cache_keyword(self._decoder())

        # New-token rows: prefix tokens then <q>. Row 0 of the lookup means "no delta".
        trainable_ids = [*self.prefix_token_ids, self.query_token_id]
        lookup = torch.zeros(inp.weight.shape[0], dtype=torch.long)
        lookup[torch.tensor(trainable_ids)] = torch.arange(1, len(trainable_ids) + 1)
        self.register_buffer("token_row", lookup, persistent=False)
        self.register_buffer("prefix_ids_t", torch.tensor(self.prefix_token_ids), persistent=False)
        self.token_delta = nn.Parameter(torch.zeros(len(trainable_ids), self.hidden),
                                        requires_grad=cfg.train_new_tokens)
        self.head_delta = None
        if not self.tied:
            self.head_delta = nn.Parameter(torch.zeros(n_prefix_tokens, self.hidden),
                                           requires_grad=cfg.train_new_tokens)

        # Frozen item features: inputs, not weights, so non-persistent (never in checkpoints).
        self.sources = sorted(feats)
        for s in self.sources:
            self.register_buffer(f"feat_{s}", feats[s], persistent=False)
        self.register_buffer("item_prefix", prefix, persistent=False)
        self.register_buffer("item_codes", _codes_tensor(prefix, self.codebook_sizes),
                             persistent=False)
        self.repeat = RepeatGate(self.hidden, cfg.repeat_init, n_gates(
            cfg.repeat_counts, cfg.text_match, cfg.repeat_rarity, cfg.novelty),
            n_tasks=len(GATE_TASKS) if cfg.task_gates else 0) if cfg.repeat_aware else None
        # The rarity channel's per-item value (set_item_rarity, from the training counts):
        # persistent, so a saved model scores with the rarities it was trained on.
        self.register_buffer("item_rarity", torch.zeros(self.n_items))
        self.fuse = ProjFuse({s: int(feats[s].shape[1]) for s in self.sources}, self.hidden,
                             target_norm, dropout=cfg.fuse_dropout)
        self.head = _Head(self.hidden, cfg.head)

    # ---------------------------------------------------------------------------- building

    def collator(self, hard_negatives: int = 0,
                 pad_to_multiple_of: int | None = None) -> SigmaCollator:
        """The collator that turns examples into this model's batches."""
        return SigmaCollator(
            pad_id=int(self.tokenizer.pad_token_id),
            item_token_id=self.item_token_id,
            query_token_id=self.query_token_id,
            level_token_ids=self.level_token_ids,
            item_prefix=self.item_prefix.cpu().numpy(),
            hard_negatives=hard_negatives,
            pad_to_multiple_of=pad_to_multiple_of,
        )

    @property
    def n_prefixes(self) -> int:
        return int(np.prod(self.codebook_sizes))

    @property
    def levels(self) -> int:
        return len(self.codebook_sizes)

    @torch.no_grad()
    def init_prefix_rows(self, level_vectors: list[np.ndarray], strength: float = 1.0) -> None:
        """Start each prefix token from what its items are about instead of from one shared row.

        ``level_vectors[lv]`` is (codes of level lv, H): e.g. the mean untrained-backbone text
        state of the items carrying that code. Centred and scaled to the typical token norm,
        it is added to the shared mean row (input and output side), so at step 0 the logit of
        a prefix already tracks how close the answer state is to its items' texts.
        """
        if len(level_vectors) != self.levels:
            raise ValueError(f"need one (codes, H) array per prefix level ({self.levels})")
        rows = []
        for lv, vec in enumerate(level_vectors):
            v = torch.as_tensor(np.asarray(vec), dtype=torch.float32)
            if v.shape != (self.codebook_sizes[lv], self.hidden):
                want = (self.codebook_sizes[lv], self.hidden)
                raise ValueError(f"level {lv}: expected shape {want}, got {tuple(v.shape)}")
            rows.append(F.normalize(v - v.mean(0, keepdim=True), dim=-1))
        direction = torch.cat(rows) * self.token_norm * strength
        n = len(self.prefix_token_ids)
        dev = self.token_delta.device
        base = self.backbone.get_input_embeddings().weight[self.prefix_ids_t].float()
        self.token_delta[:n] = (base.mean(0) + direction.to(dev) - base).to(self.token_delta.dtype)
        if self.head_delta is not None:
            out = self.backbone.get_output_embeddings().weight[self.prefix_ids_t].float()
            self.head_delta.copy_((out.mean(0) + direction.to(dev) - out).to(self.head_delta.dtype))

    @torch.no_grad()
    def item_code_centroids(self) -> list[np.ndarray]:
        """Per prefix level, the mean soft token ṽ (eval mode) of the items carrying each code;
        codes without items get zeros. For ``prefix_init: item_embedding``."""
        with _eval_mode(self):
            v = torch.cat([self.item_embeddings(idx).float() for idx in
                           torch.arange(self.n_items, device=self.item_prefix.device).split(8192)])
        codes = _codes_tensor(self.item_prefix, self.codebook_sizes)
        out = []
        for lv, size in enumerate(self.codebook_sizes):
            sums = torch.zeros(size, self.hidden, device=v.device).index_add_(0, codes[:, lv], v)
            counts = torch.bincount(codes[:, lv], minlength=size).clamp(min=1)[:, None]
            out.append((sums / counts).cpu().numpy())
        return out

    @torch.no_grad()
    def init_prefix_rows_from(self, how: str, seed: int = 0) -> None:
        """Apply a ``ModelConfig.prefix_init`` that needs nothing outside the model."""
        if how == "item_embedding":
            self.init_prefix_rows(self.item_code_centroids())
        elif how == "random":
            g = torch.Generator().manual_seed(seed)
            self.init_prefix_rows([torch.randn(size, self.hidden, generator=g).numpy()
                                   for size in self.codebook_sizes])
        elif how != "shared":
            raise ValueError(f"prefix_init {how!r} needs outside inputs (see the training stage)")

    # ---------------------------------------------------------------------------- pieces

    def _decoder(self) -> nn.Module:
        get = getattr(self.backbone, "get_decoder", None)
        if callable(get):
            with contextlib.suppress(AttributeError, NotImplementedError, ValueError):
                dec = get()
                if dec is not None and dec is not self.backbone:
                    return dec
        raise ValueError(
            f"{type(self.backbone).__name__} exposes no decoder (get_decoder); SigmaModel needs "
            "a causal LM with a separate base model and LM head"
        )

    def item_embeddings(self, idx: torch.Tensor) -> torch.Tensor:
        """ṽ of the items ``idx`` (not normalised), with gradients; dropout as the mode says."""
        feats = {s: getattr(self, f"feat_{s}")[idx] for s in self.sources}
        return self.fuse(feats)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings, with the trainable rows of the new tokens added."""
        emb = self.backbone.get_input_embeddings()(input_ids)
        delta = F.pad(self.token_delta, (0, 0, 1, 0))  # row 0 = zeros for every other token
        return emb + delta[self.token_row[input_ids]].to(emb.dtype)

    def inputs_embeds(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      soft: torch.Tensor) -> torch.Tensor:
        """Token embeddings with each placeholder's row replaced by the next row of ``soft``."""
        emb = self.embed_tokens(input_ids)
        slots = (input_ids == self.item_token_id) & attention_mask.bool()
        n = int(slots.sum())
        if n != soft.shape[0]:
            raise ValueError(f"{n} placeholder tokens in the batch but {soft.shape[0]} items")
        filled = torch.zeros_like(emb)
        filled[slots] = soft.to(emb.dtype)
        # torch.where, not an add: the placeholder's own vocabulary row must not leak through.
        return torch.where(slots[..., None], filled, emb)

    def _decode(self, embeds: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor, cache: Any = None,
                use_cache: bool = False) -> tuple[torch.Tensor, Any]:
        kwargs: dict[str, Any] = {}
        if use_cache:
            kwargs[self._cache_kw] = cache
        out = self._decoder()(inputs_embeds=embeds, attention_mask=attention_mask,
                              position_ids=position_ids, use_cache=use_cache, **kwargs)
        new_cache = getattr(out, self._cache_kw, None) if use_cache else None
        return out.last_hidden_state, new_cache

    def _prefix_rows(self) -> torch.Tensor:
        """Output-embedding rows of all prefix tokens (P, H) in fp32, trainable deltas added."""
        out = self.backbone.get_output_embeddings()
        weight = (out if out is not None else self.backbone.get_input_embeddings()).weight
        rows = weight[self.prefix_ids_t].float()
        delta = self.token_delta[: len(self.prefix_token_ids)] if self.tied else self.head_delta
        return rows + delta.float()

    def level_logits(self, h: torch.Tensor, level: int, rows: torch.Tensor | None = None,
                     copy: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the prefix tokens of ``level`` only, from final hidden states ``h``, plus
        ``copy`` (the repeat-aware copy term, see :meth:`copy_bias`)."""
        rows = self._prefix_rows() if rows is None else rows
        lo, hi = self.level_offsets[level], self.level_offsets[level + 1]
        logits = h.float() @ rows[lo:hi].T
        out = self.backbone.get_output_embeddings()
        bias = getattr(out, "bias", None) if out is not None else None
        if bias is not None:
            logits = logits + bias[self.prefix_ids_t[lo:hi]].float()
        if self.logit_softcap:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits if copy is None else logits + copy

    def prompt_slots(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     item_ids: torch.Tensor, sequence_mask: torch.Tensor | None,
                     count_items: torch.Tensor | None = None,
                     count_values: torch.Tensor | None = None,
                     match_items: torch.Tensor | None = None,
                     match_values: torch.Tensor | None = None,
                     novel_items: torch.Tensor | None = None,
                     novel_values: torch.Tensor | None = None) -> PromptSlots:
        """The copy prior's item table of a collated batch; purchase counts, text matches and
        novelty lists are read only by a model trained with them (``cfg.repeat_counts``,
        ``cfg.text_match``, ``cfg.novelty``), which cannot score without them."""
        if self.cfg.repeat_counts:
            if count_items is None or count_values is None:
                raise ValueError("this model scores with purchase counts (model.repeat_counts) "
                                 "but the batch has no count_items / count_values: build the "
                                 "prompts with tasks.count_items > 0")
        else:
            count_items = count_values = None
        if self.cfg.text_match:
            if match_items is None or match_values is None:
                raise ValueError("this model scores with the instruction's text match "
                                 "(model.text_match) but the batch has no match_items / "
                                 "match_values: build the examples with to_examples(..., "
                                 "matcher=...)")
            match_values = match_values * self.cfg.text_match_scale
        else:
            match_items = match_values = None
        rarity_items = rarity_values = None
        if self.cfg.repeat_rarity:
            rarity_items = count_items
            known = (count_items >= 0) & (count_items < self.n_items)
            rarity = self.item_rarity.to(count_items.device)[
                count_items.clamp(0, self.n_items - 1)]
            rarity_values = torch.where(known, rarity, 0.0) * self.cfg.rarity_scale
        if self.cfg.novelty:
            if novel_items is None or novel_values is None:
                raise ValueError("this model scores with novelty lists (model.novelty) but the "
                                 "batch has no novel_items / novel_values: build the prompts "
                                 "with tasks.novel_items > 0 (rerun the tasks stage)")
            novel_values = novel_values * self.cfg.novelty_scale
        else:
            novel_items = novel_values = None
        return PromptSlots.from_batch(input_ids, attention_mask, item_ids, sequence_mask,
                                      self.item_token_id, count_items, count_values,
                                      match_items, match_values, rarity_items, rarity_values,
                                      novel_items, novel_values)

    def set_item_rarity(self, train_counts: np.ndarray) -> None:
        """The rarity channel's values from each item's training purchase count: the share of
        the catalogue bought at least as often (about 0 for the best-seller, 1 for an item
        never bought), the same popularity order a long-tail quantile cuts."""
        counts = np.asarray(train_counts, dtype=np.float64)
        if counts.shape != (self.n_items,):
            raise ValueError(f"train_counts must have shape ({self.n_items},), got "
                             f"{counts.shape}")
        order = np.sort(counts)
        at_least = len(counts) - np.searchsorted(order, counts, side="left")
        rarity = at_least / max(len(counts), 1)
        self.item_rarity.copy_(torch.as_tensor(rarity, dtype=torch.float32))

    def _task_ids(self, task_ids: torch.Tensor | None) -> torch.Tensor | None:
        """The batch's task rows for the gates; a model with per-task offsets cannot score
        without them."""
        if not self.cfg.task_gates:
            return None
        if task_ids is None:
            raise ValueError("this model offsets its copy gates per task (model.task_gates) but "
                             "the batch has no task_ids: build the examples with to_examples "
                             "from rows that carry their task")
        return task_ids

    def copy_bias(self, gates: torch.Tensor | None, slots: PromptSlots | None, level: int,
                  partial: torch.Tensor | None = None, before: torch.Tensor | None = None,
                  seq_only: bool = False) -> torch.Tensor | None:
        """The copy term of ``level``'s logits for rows of ``slots`` whose partial prefix is
        ``partial`` (R, level); None for a model without it."""
        if self.repeat is None or gates is None or slots is None:
            return None
        counts = prefix_counts(slots, self.item_codes, level, self.codebook_sizes[level],
                               partial, before, seq_only)
        return prefix_bias(gates, counts)

    def item_copy_bias(self, gates: torch.Tensor, slots: PromptSlots, items: torch.Tensor,
                       before: torch.Tensor | None = None, seq_only: bool = False
                       ) -> torch.Tensor:
        """(R, X) copy term of the cosine scores of ``items`` (R, X) (-1 entries get 0)."""
        return item_bias(gates, item_counts(slots, items, before, seq_only),
                         self.cfg.temperature)

    def query_from_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """Normalised query vector from the final hidden state at <q> (fp32)."""
        return F.normalize(self.head(h.float()).float(), dim=-1)

    # ---------------------------------------------------------------------------- training

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        item_ids: torch.Tensor,
        target_item: torch.Tensor | None = None,
        target_prefix: torch.Tensor | None = None,
        hard_negatives: torch.Tensor | None = None,
        positives: torch.Tensor | None = None,
        sequence_mask: torch.Tensor | None = None,
        count_items: torch.Tensor | None = None,
        count_values: torch.Tensor | None = None,
        match_items: torch.Tensor | None = None,
        match_values: torch.Tensor | None = None,
        novel_items: torch.Tensor | None = None,
        novel_values: torch.Tensor | None = None,
        task_ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Losses of a collated batch (labels appended), or the hidden states without labels.

        ``positives`` (B, P; -1 padded) are every item admitted in the target basket: never
        InfoNCE negatives, and with ``cfg.multi_positive`` the NTP label is their prefix mix.
        ``sequence_mask`` (N,) marks the placeholders of the purchase sequence: with
        ``cfg.dense_weight > 0`` each of them is also a next-item target (NTP of its prefix from
        the token before it, InfoNCE at its last prefix token against the batch's items).
        ``count_items`` / ``count_values`` (B, H) are the households' purchase counts (the
        collator's), read by a model with ``cfg.repeat_counts``; ``match_items`` /
        ``match_values`` (B, M) the instructions' text matches, read with ``cfg.text_match``;
        ``novel_items`` / ``novel_values`` (B, V) the novelty lists, read with ``cfg.novelty``;
        ``task_ids`` (B,) the instructions' tasks, read with ``cfg.task_gates``.
        """
        n_hist = item_ids.numel()
        parts = [item_ids.view(-1)]
        if target_item is not None:
            parts.append(target_item.view(-1))
            if hard_negatives is not None and hard_negatives.numel():
                parts.append(hard_negatives.clamp(min=0).view(-1))
            if positives is not None and positives.numel():
                parts.append(positives.clamp(min=0).view(-1))
        # ProjFuse runs once per distinct item of the batch (history, targets and negatives), or
        # once per catalogue item when every item is an InfoNCE column.
        catalogue = self.cfg.infonce_negatives == "catalogue" and target_item is not None
        if catalogue:
            uniq = torch.arange(self.n_items, device=item_ids.device)
            inverse = torch.cat(parts)
        else:
            uniq, inverse = torch.unique(torch.cat(parts), return_inverse=True)
        v = self.item_embeddings(uniq)
        embeds = self.inputs_embeds(input_ids, attention_mask, v[inverse[:n_hist]])
        h, _ = self._decode(embeds, attention_mask, positions_from_mask(attention_mask))
        if target_item is None:
            return {"hidden": h}
        if target_prefix is None:
            raise ValueError("target_prefix is required with target_item")

        bsz, t = input_ids.shape
        n_levels = self.levels
        q = self.query_from_hidden(h[:, t - 1])
        zero = h.new_zeros((), dtype=torch.float32)
        slots = gates = None
        if self.repeat is not None:
            slots = self.prompt_slots(input_ids, attention_mask, item_ids, sequence_mask,
                                      count_items, count_values, match_items, match_values,
                                      novel_items, novel_values)
            # Read where the answer starts: the token before the first label token.
            gates = self.repeat(h[:, t - 2 - n_levels], self._task_ids(task_ids))
        with _no_autocast(h.device.type):
            rows = self._prefix_rows()
            codes = _codes_tensor(target_prefix, self.codebook_sizes)
            pos_codes = pos_ok = None
            if positives is not None and positives.numel():
                pos_ok = positives >= 0
                pos_flat = self.item_prefix[positives.clamp(min=0).view(-1)]
                pos_codes = _codes_tensor(pos_flat, self.codebook_sizes).view(
                    *positives.shape, n_levels)
            ntp, correct = [], torch.ones(bsz, dtype=torch.bool, device=h.device)
            for lv in range(n_levels):
                # The level-lv label token sits at column t-1-L+lv, predicted one column before.
                logits = self.level_logits(h[:, t - 2 - n_levels + lv], lv, rows,
                                           self.copy_bias(gates, slots, lv, codes))
                if self.cfg.multi_positive and pos_codes is not None:
                    soft = _positive_mix(pos_codes, pos_ok, codes, lv, logits.shape[1])
                    ntp.append(-(soft * logits.log_softmax(-1)).sum(-1).mean())
                else:
                    ntp.append(F.cross_entropy(logits, codes[:, lv]))
                correct &= logits.argmax(-1) == codes[:, lv]
            # Token-averaged like any LM loss, so λ keeps its meaning with 2-level prefixes.
            l_ntp = torch.stack(ntp).mean()

            if catalogue:
                l_nce, item_acc = self._catalogue_infonce(q, v, slots, gates, target_item,
                                                          positives)
            else:
                l_nce, item_acc = self._batch_infonce(q, v, inverse, n_hist, slots, gates,
                                                      target_item, hard_negatives, positives)

            l_ntp_d = l_nce_d = zero
            if self.cfg.dense_weight > 0 and sequence_mask is not None:
                l_ntp_d, l_nce_d = self._dense_losses(h, input_ids, attention_mask, rows, v,
                                                      item_ids, inverse[:n_hist], sequence_mask,
                                                      slots)
            loss = l_ntp + self.cfg.infonce_weight * l_nce + self.cfg.dense_weight * (
                l_ntp_d + self.cfg.infonce_weight * l_nce_d)
        return {
            "loss": loss,
            "l_ntp": l_ntp.detach(),
            "l_infonce": l_nce.detach(),
            "l_ntp_dense": l_ntp_d.detach(),
            "l_infonce_dense": l_nce_d.detach(),
            "prefix_acc": correct.float().mean(),
            "item_acc": item_acc.detach(),
        }

    def _batch_infonce(self, q: torch.Tensor, v: torch.Tensor, inverse: torch.Tensor,
                       n_hist: int, slots: PromptSlots | None, gates: torch.Tensor | None,
                       target_item: torch.Tensor, hard_negatives: torch.Tensor | None,
                       positives: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The paper's InfoNCE: in-batch targets and hard negatives (plus a repeat-aware
        model's prompt items) as the negatives."""
        bsz, offset = q.shape[0], n_hist
        v_tgt = F.normalize(v[inverse[offset:offset + bsz]].float(), dim=-1)
        logits_in = q @ v_tgt.T
        # Another row's target that is this row's target or one of its positives is not a
        # negative.
        same = target_item[None, :] == target_item[:, None]
        if positives is not None and positives.numel():
            same |= (positives[:, :, None] == target_item[None, None, :]).any(1)
        same.fill_diagonal_(False)
        if gates is not None:
            logits_in = logits_in + self.item_copy_bias(
                gates, slots, target_item[None, :].expand(bsz, -1))
        logits_in = logits_in.masked_fill(same, -torch.inf)
        cols = [logits_in]
        has_hard = hard_negatives is not None and hard_negatives.numel() > 0
        if has_hard:
            k = hard_negatives.shape[1]
            v_neg = v[inverse[offset + bsz:offset + bsz + bsz * k]].view(bsz, k, -1)
            logits_h = torch.einsum("bh,bkh->bk", q, F.normalize(v_neg.float(), dim=-1))
            if gates is not None:
                logits_h = logits_h + self.item_copy_bias(gates, slots,
                                                          hard_negatives.clamp(min=0))
            bad = (hard_negatives < 0) | (hard_negatives == target_item[:, None])
            cols.append(logits_h.masked_fill(bad, -torch.inf))
        if gates is not None:
            cols.append(self._prompt_negatives(q, v[inverse[:n_hist]], slots, gates,
                                               target_item, positives,
                                               hard_negatives if has_hard else None))
        logits_nce = torch.cat(cols, dim=1) / self.cfg.temperature
        labels = torch.arange(bsz, device=q.device)
        l_nce = F.cross_entropy(logits_nce, labels)
        item_acc = (logits_nce.argmax(-1) == labels).float().mean()
        return l_nce, item_acc

    def _catalogue_infonce(self, q: torch.Tensor, v: torch.Tensor, slots: PromptSlots | None,
                           gates: torch.Tensor | None, target_item: torch.Tensor,
                           positives: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """A full softmax over the catalogue (``v`` holds every item's ṽ): the negatives are
        what the full-ranking evaluation competes against, not a small sample of them. The
        row's other positives are masked."""
        logits = q @ F.normalize(v.float(), dim=-1).T  # (B, N)
        if gates is not None:
            logits = logits + item_bias(gates, column_counts(slots, v.shape[0]),
                                        self.cfg.temperature)
        if positives is not None and positives.numel():
            other = torch.zeros_like(logits, dtype=torch.bool)
            other.scatter_(1, positives.clamp(min=0), positives >= 0)
            other[torch.arange(len(target_item), device=logits.device), target_item] = False
            logits = logits.masked_fill(other, -torch.inf)
        logits = logits / self.cfg.temperature
        acc = (logits.argmax(-1) == target_item).float().mean()
        return F.cross_entropy(logits, target_item), acc

    def _prompt_negatives(self, q: torch.Tensor, v_hist: torch.Tensor, slots: PromptSlots,
                          gates: torch.Tensor, target_item: torch.Tensor,
                          positives: torch.Tensor | None, hard: torch.Tensor | None
                          ) -> torch.Tensor:
        """(B, J) InfoNCE columns of each row's own prompt items (repeat-aware models): the
        copy gates can only be calibrated against the items the prompt shows but the user did
        not buy next. Positives, padding, repeats within the row and items that already are a
        column (another row's target, a hard negative) are masked."""
        items = slots.items
        present = items >= 0
        vt = torch.zeros(*items.shape, v_hist.shape[-1], device=q.device, dtype=torch.float32)
        vt[present] = F.normalize(v_hist.float(), dim=-1)
        logits = torch.einsum("bh,bjh->bj", q, vt) + self.item_copy_bias(gates, slots, items)
        j = torch.arange(items.shape[1], device=items.device)
        earlier = (items[:, :, None] == items[:, None, :]) & (j[None, None, :] < j[None, :, None])
        bad = ~present | earlier.any(-1) | (items[:, :, None] == target_item[None, None, :]).any(-1)
        if positives is not None and positives.numel():
            bad |= (items[:, :, None] == positives[:, None, :]).any(-1)
        if hard is not None:
            bad |= (items[:, :, None] == hard[:, None, :]).any(-1)
        return logits.masked_fill(bad, -torch.inf)

    def _dense_losses(self, h: torch.Tensor, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor, rows: torch.Tensor, v: torch.Tensor,
                      item_ids: torch.Tensor, hist_inverse: torch.Tensor,
                      sequence_mask: torch.Tensor, prompt: PromptSlots | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-item losses at every purchase-sequence item of the prompts (ours, not the
        paper's: thousands of SFT samples instead of its ~130M, so each prompt must teach more).

        An item is written ``<c_1>..<c_L><|item|>``: level lv's code is predicted from the
        state one token before ``<c_lv>`` (as the label's NTP), and the state at ``<c_L>`` (whose
        next token is the item) is the query, scored against every distinct item of the batch
        (in-batch negatives; the item itself appears once among them)."""
        n_levels = self.levels
        slots = ((input_ids == self.item_token_id) & attention_mask.bool()).nonzero()  # (N, 2)
        keep = sequence_mask.to(slots.device).bool().view(-1)
        if keep.numel() != slots.shape[0]:
            raise ValueError(f"sequence_mask has {keep.numel()} entries for {slots.shape[0]} "
                             "placeholders")
        r, c = slots[keep, 0], slots[keep, 1]
        zero = h.new_zeros((), dtype=torch.float32)
        if r.numel() == 0:
            return zero, zero
        target = hist_inverse[keep]  # index into the batch's distinct items
        codes = _codes_tensor(self.item_prefix[item_ids.view(-1)[keep]], self.codebook_sizes)
        gates = sub = before = None
        if prompt is not None and self.repeat is not None:
            # The copy term of a history position counts only the sequence items before it:
            # the context section summarises the whole history up to the cut, so it already
            # holds this position's own item (a label leak the evaluation prompts never have).
            gates = self.repeat(h[r, c - n_levels - 1])
            sub, before = prompt.rows(r), prompt.ranks()[keep]
        ntp = []
        for lv in range(n_levels):
            col = c - n_levels + lv - 1  # the token before <c_lv>
            bias = self.copy_bias(gates, sub, lv, codes, before, seq_only=True)
            logits = self.level_logits(h[r, col], lv, rows, bias)
            ntp.append(F.cross_entropy(logits, codes[:, lv]))
        qd = self.query_from_hidden(h[r, c - 1])
        sims = qd @ F.normalize(v.float(), dim=-1).T
        if gates is not None:
            # Columns are the batch's distinct items: count them through their distinct index.
            uniq_slots = torch.full_like(prompt.items, -1)
            uniq_slots[prompt.items >= 0] = hist_inverse
            counts = column_counts(sub.with_items(uniq_slots[r]), v.shape[0], before,
                                   seq_only=True)
            sims = sims + item_bias(gates, counts, self.cfg.temperature)
        return torch.stack(ntp).mean(), F.cross_entropy(sims / self.cfg.temperature, target)

    # ---------------------------------------------------------------------------- generation

    @torch.no_grad()
    def prefix_logprobs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, item_ids: torch.Tensor,
        sequence_mask: torch.Tensor | None = None, count_items: torch.Tensor | None = None,
        count_values: torch.Tensor | None = None, match_items: torch.Tensor | None = None,
        match_values: torch.Tensor | None = None, novel_items: torch.Tensor | None = None,
        novel_values: torch.Tensor | None = None, task_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, PromptCache]:
        """Generation step 1: log-probs over the first-level prefix tokens after each prompt.

        Prompts must be left-padded (as the collator does with ``with_labels=False``). Returns
        (B, codes of level 1) log-probs (for a one-level prefix: over all flat prefixes) and a
        :class:`PromptCache` for :meth:`query_vectors`. ``sequence_mask`` (the collator's) tells
        a repeat-aware model the purchase sequence from the context section (None: all
        sequence); ``count_items`` ... ``task_ids`` are the purchase counts, text
        matches, novelty lists and tasks (see forward).
        """
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("prompts must be left-padded: the last column must be real tokens")
        with _eval_mode(self):
            uniq, inverse = torch.unique(item_ids.view(-1), return_inverse=True)
            soft = self.item_embeddings(uniq)[inverse]
            embeds = self.inputs_embeds(input_ids, attention_mask, soft)
            pos = positions_from_mask(attention_mask)
            h, kv = self._decode(embeds, attention_mask, pos, use_cache=True)
            cache = self.prompt_cache(h[:, -1], kv, attention_mask, pos[:, -1] + 1, input_ids,
                                      attention_mask, item_ids, sequence_mask, count_items,
                                      count_values, match_items, match_values, novel_items,
                                      novel_values, task_ids)
        return cache.logprobs, cache

    def prompt_cache(self, h_last: torch.Tensor, kv: Any, cache_mask: torch.Tensor,
                     next_position: torch.Tensor, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor, item_ids: torch.Tensor,
                     sequence_mask: torch.Tensor | None, count_items: torch.Tensor | None = None,
                     count_values: torch.Tensor | None = None,
                     match_items: torch.Tensor | None = None,
                     match_values: torch.Tensor | None = None,
                     novel_items: torch.Tensor | None = None,
                     novel_values: torch.Tensor | None = None,
                     task_ids: torch.Tensor | None = None) -> PromptCache:
        """The end of step 1 once the backbone has read the prompts (all of them, or only a
        new suffix over a reused KV cache, as the nearline job does): the level-1 prefix
        log-probs from the last hidden state, with a repeat-aware model's copy term, whose
        item table always comes from the full prompts (``input_ids`` ... ``sequence_mask``,
        collated). ``cache_mask`` and ``next_position`` describe ``kv``."""
        slots = gates = None
        if self.repeat is not None:
            slots = self.prompt_slots(input_ids, attention_mask, item_ids, sequence_mask,
                                      count_items, count_values, match_items, match_values,
                                      novel_items, novel_values)
            gates = self.repeat(h_last, self._task_ids(task_ids))
        logp = F.log_softmax(self.level_logits(h_last, 0, copy=self.copy_bias(gates, slots, 0)),
                             dim=-1)
        return PromptCache(kv, cache_mask, next_position, logp, slots, gates)

    def _repeat_rows(self, cache: PromptCache, k: int
                     ) -> tuple[PromptSlots | None, torch.Tensor | None]:
        """The cache's item table and gates repeated for K continuations per prompt."""
        if cache.slots is None or cache.repeat_gates is None:
            return None, None
        idx = torch.arange(cache.slots.items.shape[0], device=cache.slots.items.device)
        idx = idx.repeat_interleave(k)
        return cache.slots.rows(idx), cache.repeat_gates[idx]

    def item_copy_scores(self, cache: PromptCache, items: torch.Tensor) -> torch.Tensor | None:
        """(B, ...) copy term on the cosine scale of ``items`` (B, ...) for each prompt of the
        cache (None for a model without it); entries of -1 get 0."""
        if cache.slots is None or cache.repeat_gates is None:
            return None
        flat = items.reshape(items.shape[0], -1)
        return self.item_copy_bias(cache.repeat_gates, cache.slots, flat).view(items.shape)

    def _continue(self, cache: PromptCache, codes: torch.Tensor, levels: int,
                  query: bool) -> torch.Tensor:
        """Feed the first ``levels`` prefix tokens of ``codes`` (B*K, L) (then ``<q>``) after
        each prompt, K continuations per prompt over the prompt's KV cache; returns the final
        hidden states of the fed tokens (B*K, levels (+1), H). The cache is left as it was."""
        rows = codes.shape[0]
        level_ids = [torch.tensor(ids, device=codes.device) for ids in self.level_token_ids]
        cols = [level_ids[lv][codes[:, lv]] for lv in range(levels)]
        if query:
            cols.append(torch.full((rows,), self.query_token_id, device=codes.device))
        tokens = torch.stack(cols, dim=1)
        if self.cfg.shared_prefix_decode and _croppable(cache.past_key_values):
            return self._continue_shared(cache, tokens)
        return self._continue_expanded(cache, tokens)

    def _continue_expanded(self, cache: PromptCache, tokens: torch.Tensor) -> torch.Tensor:
        """Plain path: a copy of the cache repeated K times along the batch (memory x K)."""
        k = tokens.shape[0] // cache.attention_mask.shape[0]
        kv = copy.deepcopy(cache.past_key_values)
        kv.batch_repeat_interleave(k)
        mask = torch.cat([cache.attention_mask.repeat_interleave(k, dim=0),
                          torch.ones_like(tokens)], dim=1)
        pos = cache.next_position.repeat_interleave(k)[:, None] + torch.arange(
            tokens.shape[1], device=tokens.device)
        with _eval_mode(self):
            h, _ = self._decode(self.embed_tokens(tokens), mask, pos, cache=kv, use_cache=True)
        return h

    def _continue_shared(self, cache: PromptCache, tokens: torch.Tensor) -> torch.Tensor:
        """Fast path: the K continuations of a prompt go in ONE row, side by side, under a 4D
        mask that lets each continuation see the prompt and itself only, with the positions it
        would have alone. The prompt's keys and values are read once, never copied; the
        appended tokens are cropped from the cache afterwards."""
        bsz, t = cache.attention_mask.shape
        k, g = tokens.shape[0] // bsz, tokens.shape[1]
        dev = tokens.device
        new = tokens.view(bsz, k * g)
        group = torch.arange(k * g, device=dev) // g
        step = torch.arange(k * g, device=dev) % g
        # (K*g, K*g): same continuation and not in the future of it.
        own = (group[:, None] == group[None, :]) & (step[:, None] >= step[None, :])
        allowed = torch.cat([cache.attention_mask.bool()[:, None, :].expand(bsz, k * g, t),
                             own[None].expand(bsz, -1, -1)], dim=2)
        dtype = self.backbone.get_input_embeddings().weight.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill(
            ~allowed, torch.finfo(dtype).min)[:, None]
        pos = cache.next_position[:, None] + step[None, :]
        kv = cache.past_key_values
        try:
            with _eval_mode(self):
                h, _ = self._decode(self.embed_tokens(new), mask, pos, cache=kv, use_cache=True)
        finally:
            extra = kv.get_seq_length() - t
            if extra > 0:
                kv.crop(-extra)
        return h.reshape(bsz * k, g, -1)

    @torch.no_grad()
    def next_level_logprobs(self, cache: PromptCache, partial: torch.Tensor,
                            level: int) -> torch.Tensor:
        """Prefix beam search below level 0: log-probs (B, K, codes of ``level``) of the next
        prefix token after the partial prefixes ``partial`` (B, K), flat ids over the first
        ``level`` levels."""
        bsz, k = partial.shape
        if not 1 <= level < self.levels:
            raise ValueError(f"level must be in 1..{self.levels - 1}, got {level}")
        codes = _codes_tensor(partial.reshape(-1), self.codebook_sizes[:level])
        h = self._continue(cache, codes, level, query=False)
        slots, gates = self._repeat_rows(cache, k)
        with _eval_mode(self):
            lp = F.log_softmax(self.level_logits(
                h[:, -1], level, copy=self.copy_bias(gates, slots, level, codes)), dim=-1)
        return lp.view(bsz, k, -1)

    @torch.no_grad()
    def query_vectors(
        self, cache: PromptCache, prefix_ids: torch.Tensor, return_prefix_logprobs: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Generation step 2: feed ``<c_k><q>`` for K flat prefixes per prompt, batched over the
        shared KV cache (expanded along the batch), and read the normalised query vectors.

        ``prefix_ids`` is (B, K) of flat prefix ids; returns (B, K, H). With
        ``return_prefix_logprobs`` also the (B, K) log P(prefix | prompt) chained over the
        prefix levels (for one level it equals ``cache.logprobs`` gathered at the prefixes).
        The given cache is left unchanged, so it can be continued again.
        """
        bsz, k = prefix_ids.shape
        n_levels = self.levels
        codes = _codes_tensor(prefix_ids.reshape(-1), self.codebook_sizes)  # (B*K, L)
        h = self._continue(cache, codes, n_levels, query=True)
        with _eval_mode(self):
            q = self.query_from_hidden(h[:, -1]).view(bsz, k, -1)
            if not return_prefix_logprobs:
                return q
            lp = cache.logprobs.repeat_interleave(k, dim=0).gather(1, codes[:, :1]).squeeze(1)
            slots, gates = self._repeat_rows(cache, k)
            for lv in range(1, n_levels):
                step = F.log_softmax(self.level_logits(
                    h[:, lv - 1], lv, copy=self.copy_bias(gates, slots, lv, codes)), dim=-1)
                lp = lp + step.gather(1, codes[:, lv:lv + 1]).squeeze(1)
        return q, lp.view(bsz, k)

    @torch.no_grad()
    def item_vectors(self, idx: torch.Tensor | np.ndarray | None = None,
                     batch_size: int = 8192) -> torch.Tensor:
        """Normalised ṽ (eval mode, fp32) of ``idx``, or of every item when ``idx`` is None."""
        if idx is None:
            idx = torch.arange(self.n_items, device=self.item_prefix.device)
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.item_prefix.device)
        with _eval_mode(self):
            out = [F.normalize(self.item_embeddings(idx[s:s + batch_size]).float(), dim=-1)
                   for s in range(0, len(idx), batch_size)]
        return torch.cat(out) if out else torch.empty(0, self.hidden)

    # ---------------------------------------------------------------------------- save/load

    def trainable_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def trainable_state(self, state: Mapping[str, torch.Tensor] | None = None
                        ) -> dict[str, torch.Tensor]:
        """What training changes (adapters, new-token rows, ProjFuse, head; all weights with
        full fine-tuning), as CPU copies. ``state`` filters a full state dict instead (e.g. the
        gathered one of an FSDP model)."""
        full = self.state_dict() if state is None else state
        keep = set(self.trainable_names()) | {k for k in full if k.startswith("fuse.")}
        if self.cfg.repeat_rarity:
            keep.add("item_rarity")
        return {k: v.detach().to("cpu", copy=True).contiguous()
                for k, v in full.items() if k in keep}

    def load_trainable_state(self, state: Mapping[str, torch.Tensor]) -> None:
        own = self.state_dict()
        unknown = sorted(set(state) - set(own))
        if unknown:
            raise ValueError(f"weights for unknown parameters: {unknown[:3]}")
        needed = set(self.trainable_names()) | ({"item_rarity"} if self.cfg.repeat_rarity
                                                 else set())
        missing = sorted(needed - set(state))
        if missing:
            raise ValueError(f"weights missing for trainable parameters: {missing[:3]}")
        self.load_state_dict(dict(state), strict=False)

    def meta(self) -> dict[str, Any]:
        return {
            "format": 1,
            "model_config": self.cfg.model_dump(mode="json"),
            "codebook_sizes": self.codebook_sizes,
            "query_token": self.vocab.query_token,
            "prefix_token_ids": self.prefix_token_ids,
            "query_token_id": self.query_token_id,
            "item_token_id": self.item_token_id,
            "feature_dims": {s: int(getattr(self, f"feat_{s}").shape[1]) for s in self.sources},
            "n_items": self.n_items,
            "hidden": self.hidden,
        }

    def save_trainable(self, folder: Path, state: Mapping[str, torch.Tensor] | None = None
                       ) -> None:
        """Write the trainable weights and what is needed to rebuild the model into ``folder``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = self.trainable_state(state)
        save_file(tensors, str(folder / WEIGHTS_FILE))
        (folder / META_FILE).write_text(json.dumps(self.meta(), indent=2) + "\n")

    def load_trainable(self, folder: Path) -> None:
        from safetensors.torch import load_file

        folder = Path(folder)
        meta = json.loads((folder / META_FILE).read_text())
        for key in ("prefix_token_ids", "query_token_id", "item_token_id", "n_items", "hidden"):
            if meta[key] != self.meta()[key]:
                raise ValueError(f"{folder}: saved {key} differs from this model's; the weights "
                                 "belong to another vocabulary, catalogue or backbone")
        state = load_file(str(folder / WEIGHTS_FILE))
        device = self.item_prefix.device
        self.load_trainable_state({k: v.to(device) for k, v in state.items()})


# -------------------------------------------------------------------------------- builders


def build_sigma_model(
    backbone_cfg: BackboneConfig,
    model_cfg: ModelConfig,
    vocab: HybridVocab,
    item_features: Mapping[str, np.ndarray | torch.Tensor],
    item_prefix: np.ndarray,
) -> tuple[SigmaModel, dict[str, Any]]:
    """Load the backbone and wrap it; returns (model, backbone facts)."""
    from sigmarec.backbone.loading import load_backbone

    backbone, tokenizer, facts = load_backbone(backbone_cfg)
    return SigmaModel(backbone, tokenizer, vocab, item_features, item_prefix, model_cfg), facts


def load_sigma_model(
    folder: Path,
    backbone_cfg: BackboneConfig,
    item_features: Mapping[str, np.ndarray | torch.Tensor],
    item_prefix: np.ndarray,
) -> SigmaModel:
    """Rebuild a model saved with :meth:`SigmaModel.save_trainable` (eval mode)."""
    meta = json.loads((Path(folder) / META_FILE).read_text())
    vocab = HybridVocab(codebook_sizes=meta["codebook_sizes"], query_token=meta["query_token"])
    model, _ = build_sigma_model(backbone_cfg, ModelConfig(**meta["model_config"]), vocab,
                                 item_features, item_prefix)
    model.load_trainable(folder)
    return model.eval()


# -------------------------------------------------------------------------------- helpers


def _text_config(model: nn.Module) -> Any:
    get = getattr(model.config, "get_text_config", None)
    return get() if callable(get) else model.config


def _typical_embedding_norm(model: nn.Module, vocab_size: int, sample: int = 8192) -> float:
    """Median norm of the embedding layer's outputs (scaled embeddings included)."""
    emb = model.get_input_embeddings()
    n = min(vocab_size, emb.weight.shape[0])
    ids = torch.linspace(0, n - 1, steps=min(n, sample)).long().to(emb.weight.device)
    with torch.no_grad():
        return float(emb(ids).float().norm(dim=-1).median())


def _croppable(kv: Any) -> bool:
    """A plain DynamicCache (full attention in every layer) can take the appended continuation
    tokens and drop them again; sliding-window or static caches take the copying path."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    layers = getattr(kv, "layers", None)
    return (type(kv) is DynamicCache and layers is not None
            and all(type(layer) is DynamicLayer for layer in layers))


def _positive_mix(pos_codes: torch.Tensor, pos_ok: torch.Tensor, codes: torch.Tensor,
                  level: int, n_codes: int) -> torch.Tensor:
    """(B, codes of ``level``) soft NTP label: the share of the row's positives with each code
    among those that agree with the fed label tokens (the target's codes) above ``level``."""
    agree = pos_ok.clone()
    for up in range(level):
        agree &= pos_codes[..., up] == codes[:, None, up]
    soft = torch.zeros(codes.shape[0], n_codes, device=codes.device)
    soft.scatter_add_(1, pos_codes[..., level].clamp(min=0), agree.float())
    # The target itself always agrees, so every row has mass; guard anyway.
    return soft / soft.sum(-1, keepdim=True).clamp(min=1e-9)


@contextlib.contextmanager
def _no_autocast(device_type: str) -> Iterator[None]:
    # Losses in fp32: cosine logits divided by a small temperature lose too much in bf16.
    with torch.autocast(device_type=device_type, enabled=False):
        yield


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)
