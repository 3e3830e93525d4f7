"""The GR baseline model: the backbone with LoRA, items as new vocabulary tokens, next-token loss.

Same backbone and adapters as SIGMA (``model`` section: LoRA rank/alpha/dropout/targets), but
every item is written with vocabulary tokens only (see :mod:`sigmarec.gr.items`), in the
history and in the answer. The loss is the standard causal-LM cross-entropy over the FULL
vocabulary on the label tokens only (prompt positions carry label -100), as TIGER/LC-Rec train.

New-token rows: as in :class:`sigmarec.model.sigma.SigmaModel`, the rows of the new tokens are
a separate small parameter ``token_delta`` (and ``head_delta`` when the output embeddings are
untied) added to the frozen rows that ``add_special_tokens`` initialised, instead of unfreezing
the embedding matrix with a gradient mask: the optimizer holds state for the new rows only,
weight decay never touches other rows, and a checkpoint holds only LoRA + these rows. The deltas
are applied by forward hooks on the backbone's input-embedding and output-embedding modules, so
Hugging Face ``generate`` (beam search) sees exactly the trained model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from sigmarec.backbone.loading import add_special_tokens
from sigmarec.gr.items import ItemTokens
from sigmarec.model.adapt import adapt_backbone, cache_keyword
from sigmarec.model.batch import left_pad
from sigmarec.model.checkpoint import TrainableCheckpoint
from sigmarec.model.codes import positions_from_mask, text_config
from sigmarec.model.config import ModelConfig

if TYPE_CHECKING:
    from sigmarec.backbone.config import BackboneConfig

WEIGHTS_FILE = "gr_trainable.safetensors"
META_FILE = "gr_model.json"


@dataclass(frozen=True)
class GRExample:
    """One tokenised prompt (items already written as tokens) and its target item."""

    input_ids: list[int]
    target_item: int


def _field(example: Any, name: str) -> Any:
    return example[name] if isinstance(example, Mapping) else getattr(example, name)


class GRCollator:
    """Left-pads prompts and appends the target's token sequence; ``labels`` is -100 on the
    prompt and padding, the label token ids on the appended tail.

    Left padding puts every row's label in the same last columns and makes prompt-only batches
    (``with_labels=False``) end in the same column, which ``generate`` needs.
    """

    def __init__(self, pad_id: int, item_seqs: np.ndarray,
                 pad_to_multiple_of: int | None = None) -> None:
        self.pad_id = int(pad_id)
        self.item_seqs = np.asarray(item_seqs, dtype=np.int64)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[Any], *, with_labels: bool = True,
                 rng: np.random.Generator | None = None) -> dict[str, torch.Tensor]:
        # ``rng`` is accepted for the training loop's collator contract; GR draws no negatives.
        if not examples:
            raise ValueError("cannot collate an empty batch")
        rows, label_lens = [], []
        for i, ex in enumerate(examples):
            ids = [int(t) for t in _field(ex, "input_ids")]
            tail: list[int] = []
            if with_labels:
                t = int(_field(ex, "target_item"))
                if not 0 <= t < len(self.item_seqs):
                    raise ValueError(f"example {i}: target_item {t} is not a known item")
                tail = self.item_seqs[t].tolist()
            rows.append(ids + tail)
            label_lens.append(len(tail))
        input_ids, mask = left_pad(rows, self.pad_id, self.pad_to_multiple_of)
        length = input_ids.shape[1]
        labels = torch.full((len(rows), length), -100, dtype=torch.long)
        for i, n in enumerate(label_lens):
            if n:
                labels[i, length - n:] = input_ids[i, length - n:]
        batch = {"input_ids": input_ids, "attention_mask": mask}
        if with_labels:
            batch["labels"] = labels
        return batch


class GRModel(TrainableCheckpoint, nn.Module):
    """GR(SID) or GR(ID) over a Hugging Face causal LM; see the module docstring. Its
    checkpoint holds the LoRA adapters and new-token rows (everything with full fine-tuning)."""

    weights_file = WEIGHTS_FILE
    meta_file = META_FILE
    identity_keys = ("scheme", "new_token_ids", "n_items", "hidden")
    identity_what = "another scheme, catalogue or backbone"

    def __init__(self, backbone: nn.Module, tokenizer: Any, items: ItemTokens,
                 cfg: ModelConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or ModelConfig()
        self.cfg, self.tokenizer, self.items = cfg, tokenizer, items
        text_cfg = text_config(backbone)
        self.hidden = int(text_cfg.hidden_size)
        self.logit_softcap = getattr(text_cfg, "final_logit_softcapping", None)
        ids = add_special_tokens(backbone, tokenizer, items.tokens)
        if len(set(ids)) != len(ids):
            raise ValueError("the item tokens must be distinct vocabulary entries")
        self.new_token_ids = ids
        ids_t = torch.tensor(ids, dtype=torch.long)
        self.register_buffer("new_ids_t", ids_t, persistent=False)
        # (n_items, L) vocabulary ids of every item's sequence: labels and the decoding trie.
        self.register_buffer("item_seqs", ids_t[torch.from_numpy(items.seqs)], persistent=False)

        inp = backbone.get_input_embeddings()
        out = backbone.get_output_embeddings()
        if out is None:
            raise ValueError(f"{type(backbone).__name__} has no output embeddings (LM head)")
        self.tied = out.weight.data_ptr() == inp.weight.data_ptr()
        self.vocab_rows = int(out.weight.shape[0])
        backbone = adapt_backbone(backbone, cfg)
        self.backbone = backbone
        self.cache_keyword = cache_keyword(self._decoder())

        lookup = torch.zeros(inp.weight.shape[0], dtype=torch.long)
        lookup[ids_t] = torch.arange(1, len(ids) + 1)
        self.register_buffer("token_row", lookup, persistent=False)  # 0 = not a new token
        self.token_delta = nn.Parameter(torch.zeros(len(ids), self.hidden),
                                        requires_grad=cfg.train_new_tokens)
        self.head_delta = None
        if not self.tied:
            self.head_delta = nn.Parameter(torch.zeros(len(ids), self.hidden),
                                           requires_grad=cfg.train_new_tokens)
        self._hooks = [inp.register_forward_hook(self._embed_hook),
                       out.register_forward_hook(self._head_hook)]

    # ------------------------------------------------------------------------------ hooks

    def _embed_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        rows = self.token_row[args[0]]
        # A gather plus where (no copy of the whole delta table): GR(ID) has one row per item.
        delta = self.token_delta[(rows - 1).clamp(min=0)].to(output.dtype)
        return torch.where((rows > 0)[..., None], output + delta, output)

    def _head_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        delta = self.token_delta if self.tied else self.head_delta
        corr = args[0].to(delta.dtype) @ delta.T
        return output.index_add(-1, self.new_ids_t, corr.to(output.dtype))

    # ------------------------------------------------------------------------------ training

    def collator(self, hard_negatives: int = 0,
                 pad_to_multiple_of: int | None = None) -> GRCollator:
        """The training loop's collator hook; ``hard_negatives`` does not apply to GR."""
        return GRCollator(int(self.tokenizer.pad_token_id), self.item_seqs.cpu().numpy(),
                          pad_to_multiple_of)

    def _decoder(self) -> nn.Module:
        get = getattr(self.backbone, "get_decoder", None)
        dec = get() if callable(get) else None
        if dec is None or dec is self.backbone:
            raise ValueError(f"{type(self.backbone).__name__} exposes no decoder (get_decoder)")
        return dec

    def label_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-vocabulary logits (N, V) at the positions that predict a label token, and those
        N labels (row-major). The LM head runs only there: same loss as HF's shifted
        causal-LM loss with -100 on the prompt, without a (tokens x vocabulary) matmul."""
        h = self._decoder()(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=positions_from_mask(attention_mask),
                            use_cache=False).last_hidden_state
        return self._logits_at(h, labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss and the training loop's metrics: ``prefix_acc`` = first label token right,
        ``item_acc`` = every label token right (both under teacher forcing)."""
        h = self._decoder()(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=positions_from_mask(attention_mask),
                            use_cache=False).last_hidden_state
        logits, tgt = self._logits_at(h, labels)
        l_label = F.cross_entropy(logits, tgt)
        loss = l_label
        bsz, n = input_ids.shape[0], self.items.length
        if tgt.numel() != bsz * n:
            raise ValueError(f"expected {n} label tokens per row, got {tgt.numel()} in {bsz} rows")
        correct = (logits.argmax(-1) == tgt).view(bsz, n)
        zero = loss.detach() * 0
        l_dense = zero
        if self.cfg.dense_weight > 0:
            # The same dense next-item loss SIGMA gets, so the comparison stays fair: every item
            # token of the prompt's history is a next-token target (its tokens in the prompt).
            hist = (self.token_row[input_ids] > 0) & attention_mask.bool() & (labels == -100)
            dense_labels = torch.where(hist, input_ids, torch.full_like(input_ids, -100))
            if bool(hist[:, 1:].any()):
                d_logits, d_tgt = self._logits_at(h, dense_labels)
                l_dense = F.cross_entropy(d_logits, d_tgt)
                loss = loss + self.cfg.dense_weight * l_dense
        return {"loss": loss, "l_ntp": l_label.detach(), "l_infonce": zero,
                "l_ntp_dense": l_dense.detach(), "l_infonce_dense": zero,
                "prefix_acc": correct[:, 0].float().mean(),
                "item_acc": correct.all(dim=1).float().mean()}

    def _logits_at(self, h: torch.Tensor, labels: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        tgt = labels[:, 1:]
        sel = tgt != -100
        logits = self.backbone.get_output_embeddings()(h[:, :-1][sel]).float()
        if self.logit_softcap:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits, tgt[sel]

    # ------------------------------------------------------------------------------ save/load

    def weights_device(self) -> torch.device:
        return self.token_delta.device

    def meta(self) -> dict[str, Any]:
        return {"format": 1, "scheme": self.items.name, "model_config":
                self.cfg.model_dump(mode="json"), "new_token_ids": self.new_token_ids,
                "n_items": self.items.n_items, "tokens_per_item": self.items.length,
                "hidden": self.hidden}


def build_gr_model(backbone_cfg: BackboneConfig, model_cfg: ModelConfig, items: ItemTokens
                   ) -> tuple[GRModel, dict[str, Any]]:
    """Load the backbone and wrap it; returns (model, backbone facts)."""
    from sigmarec.backbone.loading import load_backbone

    backbone, tokenizer, facts = load_backbone(backbone_cfg)
    return GRModel(backbone, tokenizer, items, model_cfg), facts
