"""SIGMA's generation steps over a KV cache: the level-1 prefix log-probs of a prompt batch
(step 1, with the copy prior's term), the next levels' log-probs, and the query vectors of
``<c_k><q>`` continuations (step 2), all continuing one cache of the prompts. A mixin of
:class:`~sigmarec.model.sigma.SigmaModel`; the decoders in :mod:`sigmarec.generation` and the
serving KV cache call it."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from sigmarec.model.batch import PromptBatch
from sigmarec.model.codes import eval_mode, positions_from_mask
from sigmarec.model.repeat import PromptSlots
from sigmarec.tokenization.hybrid import flat_to_codes


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



def croppable(kv: Any) -> bool:
    """A plain DynamicCache (full attention in every layer) can take the appended continuation
    tokens and drop them again; sliding-window or static caches take the copying path."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    layers = getattr(kv, "layers", None)
    return (type(kv) is DynamicCache and layers is not None
            and all(type(layer) is DynamicLayer for layer in layers))



class Generation:
    """The generation methods of the SIGMA model."""

    @torch.no_grad()
    def prefix_logprobs(self, prompt: PromptBatch) -> tuple[torch.Tensor, PromptCache]:
        """Generation step 1: log-probs over the first-level prefix tokens after each prompt.

        Prompts must be left-padded (as the collator does with ``with_labels=False``). Returns
        (B, codes of level 1) log-probs (for a one-level prefix: over all flat prefixes) and a
        :class:`PromptCache` for :meth:`query_vectors`. ``prompt.sequence_mask`` tells a
        repeat-aware model the purchase sequence from the context section (None: all
        sequence); ``prompt.lists`` / ``task_ids`` its channels' lists and the tasks.
        """
        input_ids, attention_mask = prompt.input_ids, prompt.attention_mask
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("prompts must be left-padded: the last column must be real tokens")
        with eval_mode(self):
            uniq, inverse = torch.unique(prompt.item_ids.view(-1), return_inverse=True)
            soft = self.item_embeddings(uniq)[inverse]
            embeds = self.inputs_embeds(input_ids, attention_mask, soft)
            pos = positions_from_mask(attention_mask)
            h, kv = self.decode(embeds, attention_mask, pos, use_cache=True)
            cache = self.prompt_cache(h[:, -1], kv, attention_mask, pos[:, -1] + 1, prompt)
        return cache.logprobs, cache

    def prompt_cache(self, h_last: torch.Tensor, kv: Any, cache_mask: torch.Tensor,
                     next_position: torch.Tensor, prompt: PromptBatch) -> PromptCache:
        """The end of step 1 once the backbone has read the prompts (all of them, or only a
        new suffix over a reused KV cache, as the nearline job does): the level-1 prefix
        log-probs from the last hidden state, with a repeat-aware model's copy term, whose
        item table always comes from the full prompts (``prompt``, collated). ``cache_mask``
        and ``next_position`` describe ``kv``."""
        slots = gates = None
        if self.repeat is not None:
            slots = self.prompt_slots(prompt)
            gates = self.repeat(h_last, self.gate_task_ids(prompt.task_ids))
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
        if self.cfg.shared_prefix_decode and croppable(cache.past_key_values):
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
        with eval_mode(self):
            h, _ = self.decode(self.embed_tokens(tokens), mask, pos, cache=kv, use_cache=True)
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
            with eval_mode(self):
                h, _ = self.decode(self.embed_tokens(new), mask, pos, cache=kv, use_cache=True)
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
        codes = flat_to_codes(partial.reshape(-1), self.codebook_sizes[:level])
        h = self._continue(cache, codes, level, query=False)
        slots, gates = self._repeat_rows(cache, k)
        with eval_mode(self):
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
        codes = flat_to_codes(prefix_ids.reshape(-1), self.codebook_sizes)  # (B*K, L)
        h = self._continue(cache, codes, n_levels, query=True)
        with eval_mode(self):
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
        with eval_mode(self):
            out = [F.normalize(self.item_embeddings(idx[s:s + batch_size]).float(), dim=-1)
                   for s in range(0, len(idx), batch_size)]
        return torch.cat(out) if out else torch.empty(0, self.hidden)
