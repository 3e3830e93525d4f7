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

The class is assembled from one mixin per job, each in its own module, in layers with no
import circle: :mod:`~sigmarec.model.codes` (small tensor helpers), :mod:`~sigmarec.model.heads`
(the query head), :mod:`~sigmarec.model.copy_prior` (the copy prior's wiring),
:mod:`~sigmarec.model.losses`, :mod:`~sigmarec.model.prompt_cache` (generation over a KV cache),
:mod:`~sigmarec.model.checkpoint` (shared with the GR baselines) and
:mod:`~sigmarec.model.prefix_init`. This module holds the token rows, the prompt embedding and
``forward``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from sigmarec.backbone.loading import add_special_tokens
from sigmarec.model.adapt import adapt_backbone, cache_keyword
from sigmarec.model.batch import GATE_TASKS, PromptBatch, SigmaCollator
from sigmarec.model.checkpoint import TrainableCheckpoint
from sigmarec.model.codes import (
    no_autocast,
    positions_from_mask,
    text_config,
    typical_embedding_norm,
)
from sigmarec.model.config import ModelConfig
from sigmarec.model.copy_prior import CopyPrior
from sigmarec.model.heads import QueryHead
from sigmarec.model.losses import Losses
from sigmarec.model.prefix_init import PrefixInit
from sigmarec.model.prompt_cache import Generation, PromptCache
from sigmarec.model.repeat import RepeatGate, gate_channels, n_gates
from sigmarec.tasks.channels import CHANNELS, active_channels, collated_channels
from sigmarec.tokenization.hybrid import HybridVocab, ProjFuse, flat_to_codes

if TYPE_CHECKING:
    from sigmarec.backbone.config import BackboneConfig

WEIGHTS_FILE = "sigma_trainable.safetensors"
META_FILE = "sigma_model.json"

# PromptBatch, PromptCache and positions_from_mask live in their own modules now; importers of
# this module keep finding them here.
__all__ = ["META_FILE", "WEIGHTS_FILE", "PromptBatch", "PromptCache", "SigmaModel",
           "build_sigma_model", "load_sigma_model", "positions_from_mask"]


class SigmaModel(PrefixInit, CopyPrior, Losses, Generation, TrainableCheckpoint, nn.Module):
    """The SFT model; see the module docstring. Build it before wrapping with accelerate."""

    weights_file = WEIGHTS_FILE
    meta_file = META_FILE
    identity_keys = ("prefix_token_ids", "query_token_id", "item_token_id", "n_items", "hidden")

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

        text_cfg = text_config(backbone)
        self.hidden = int(text_cfg.hidden_size)
        self.logit_softcap = getattr(text_cfg, "final_logit_softcapping", None)
        # Measured before the new rows exist: the soft tokens are scaled to look like tokens.
        target_norm = typical_embedding_norm(backbone, len(tokenizer))
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
        self.register_buffer("item_codes", flat_to_codes(prefix, self.codebook_sizes),
                             persistent=False)
        # Two gates per channel, in the registry's order (sigmarec.tasks.channels).
        self.repeat = RepeatGate(self.hidden, cfg.repeat_init, n_gates(cfg),
                                 n_tasks=len(GATE_TASKS) if cfg.task_gates else 0
                                 ) if cfg.repeat_aware else None
        # The rarity channel's per-item value (set_item_rarity, from the training counts):
        # persistent, so a saved model scores with the rarities it was trained on.
        self.register_buffer("item_rarity", torch.zeros(self.n_items))
        self.fuse = ProjFuse({s: int(feats[s].shape[1]) for s in self.sources}, self.hidden,
                             target_norm, dropout=cfg.fuse_dropout)
        self.head = QueryHead(self.hidden, cfg.head)

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

    def decode(self, embeds: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor, cache: Any = None,
                use_cache: bool = False) -> tuple[torch.Tensor, Any]:
        """The backbone's decoder over ``embeds``: (last hidden states, the new cache with
        ``use_cache``, else None)."""
        kwargs: dict[str, Any] = {}
        if use_cache:
            kwargs[self._cache_kw] = cache
        out = self._decoder()(inputs_embeds=embeds, attention_mask=attention_mask,
                              position_ids=position_ids, use_cache=use_cache, **kwargs)
        new_cache = getattr(out, self._cache_kw, None) if use_cache else None
        return out.last_hidden_state, new_cache

    def prefix_rows(self) -> torch.Tensor:
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
        rows = self.prefix_rows() if rows is None else rows
        lo, hi = self.level_offsets[level], self.level_offsets[level + 1]
        logits = h.float() @ rows[lo:hi].T
        out = self.backbone.get_output_embeddings()
        bias = getattr(out, "bias", None) if out is not None else None
        if bias is not None:
            logits = logits + bias[self.prefix_ids_t[lo:hi]].float()
        if self.logit_softcap:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits if copy is None else logits + copy

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
        task_ids: torch.Tensor | None = None,
        **lists: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Losses of a collated batch (labels appended), or the hidden states without labels.

        ``positives`` (B, P; -1 padded) are every item admitted in the target basket: never
        InfoNCE negatives, and with ``cfg.multi_positive`` the NTP label is their prefix mix.
        ``sequence_mask`` (N,) marks the placeholders of the purchase sequence: with
        ``cfg.dense_weight > 0`` each of them is also a next-item target (NTP of its prefix from
        the token before it, InfoNCE at its last prefix token against the batch's items).
        ``lists`` are the collator's channel fields (``<key>_items`` / ``<key>_values``, e.g.
        ``count_items``), read by a model with the channel; ``task_ids`` (B,) the
        instructions' tasks, read with ``cfg.task_gates``.
        """
        known = {col for ch in collated_channels() for col in ch.columns}
        unknown = sorted(set(lists) - known)
        if unknown:
            raise TypeError(f"SigmaModel.forward got unknown fields {unknown}; the channel "
                            f"fields are {sorted(known)}")
        prompt = PromptBatch.from_collated({"input_ids": input_ids,
                                            "attention_mask": attention_mask,
                                            "item_ids": item_ids, "sequence_mask": sequence_mask,
                                            "task_ids": task_ids, **lists})
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
        h, _ = self.decode(embeds, attention_mask, positions_from_mask(attention_mask))
        if target_item is None:
            return {"hidden": h}
        if target_prefix is None:
            raise ValueError("target_prefix is required with target_item")

        t = input_ids.shape[1]
        q = self.query_from_hidden(h[:, t - 1])
        zero = h.new_zeros((), dtype=torch.float32)
        slots = gates = None
        if self.repeat is not None:
            slots = self.prompt_slots(prompt)
            # Read where the answer starts: the token before the first label token.
            gates = self.repeat(h[:, t - 2 - self.levels], self.gate_task_ids(task_ids))
        with no_autocast(h.device.type):
            rows = self.prefix_rows()
            codes = flat_to_codes(target_prefix, self.codebook_sizes)
            l_ntp, correct = self.label_ntp(h, t, rows, codes, slots, gates, positives)
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

    # ---------------------------------------------------------------------------- save/load

    def kept_state(self, keys: set[str]) -> set[str]:
        """ProjFuse (its frozen parts too) and the channels' per-item state (e.g. the rarity
        channel's item_rarity: a saved model scores with the values it was trained on)."""
        return {k for k in keys if k.startswith("fuse.")} | self.required_state()

    def required_state(self) -> set[str]:
        return {k for ch in active_channels(self.cfg) for k in ch.state_keys}

    def weights_device(self) -> torch.device:
        return self.item_prefix.device

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
            # The copy gates' channels in gate order: loading checks them by name, so a
            # registry reordered since would not silently swap learned gates.
            "gate_channels": gate_channels(self.cfg) if self.repeat is not None else [],
        }

    def check_saved(self, folder: Path, meta: Mapping[str, Any],
                    state: Mapping[str, torch.Tensor]) -> None:
        """The saved copy gates must read this model's channels in this order. A checkpoint
        written before the names were recorded holds only the number of gates: it loads when
        that number matches this model's (the channels of that time, in today's order)."""
        if self.repeat is None:
            return
        own = gate_channels(self.cfg)
        saved = meta.get("gate_channels")
        fix = ("load it with the model config it was trained with (its run's config), or "
               "retrain it (sigma run --force training)")
        if saved is not None:
            if list(saved) != own:
                raise ValueError(f"{folder}: the copy gates were trained for the channels "
                                 f"{saved} but this model reads {own}: {fix}")
            return
        bias = state.get("repeat.proj.bias")
        if bias is not None and bias.shape[0] != 2 * len(own):
            flags = ", ".join(f"model.{c.flag}" for c in CHANNELS.values())
            raise ValueError(f"{folder}: a checkpoint without channel names holds "
                             f"{bias.shape[0]} copy gates but this model has {2 * len(own)} "
                             f"({own}); set {flags} as the run that wrote it did, or {fix}")


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
    model = SigmaModel(backbone, tokenizer, vocab, item_features, item_prefix, model_cfg)
    # What the model reads of the loaded backbone (model.backbone_layers may cut it further).
    facts["model_layers"] = (facts["layers_kept"] if model_cfg.backbone_layers is None
                             else model_cfg.backbone_layers)
    facts["finetune"] = model_cfg.finetune
    return model, facts


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

