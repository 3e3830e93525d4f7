"""The item text encoder: item text -> LLM backbone -> last-token state -> linear -> L2 norm.

The backbone is the same LLM the recommender is fine-tuned from (SIGMA part 1), adapted with LoRA
by default (full fine-tuning or a frozen backbone by config); only the adapter and the projection
are trained and saved.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from sigmarec.backbone.loading import last_token_hidden
from sigmarec.config import GroundingConfig


class ItemEncoder(nn.Module):
    def __init__(self, backbone: nn.Module, tokenizer: Any, cfg: GroundingConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        hidden = int(backbone.config.get_text_config().hidden_size)
        if cfg.finetune == "lora":
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                              lora_dropout=cfg.lora_dropout, target_modules=cfg.lora_targets,
                              bias="none")
            backbone = get_peft_model(backbone, lora)
        elif cfg.finetune == "frozen":
            backbone.requires_grad_(False)
        self.backbone = backbone
        self.proj = nn.Linear(hidden, cfg.dim)
        # A frozen backbone gives every text the same hidden state at every step: computed once,
        # training is then as cheap as training the projection (the CPU default uses this).
        self._cache: dict[str, int] | None = None
        self._cached: torch.Tensor | None = None

    def precompute(self, texts: Sequence[str], progress: str | None = None) -> None:
        if self.cfg.finetune != "frozen":
            return
        uniq = sorted(set(texts))
        self._cached = torch.as_tensor(encode_unique(self._hidden, uniq,
                                                     self.cfg.encode_batch_size, progress,
                                                     normalize=False))
        self._cache = {t: i for i, t in enumerate(uniq)}

    def cached_raw(self, texts: Sequence[str]) -> np.ndarray:
        """The frozen backbone's pooled embeddings (L2-normalised) from the cache."""
        if self._cache is None or self._cached is None:
            raise RuntimeError("precompute() the frozen backbone states first")
        h = self._cached[[self._cache[t] for t in texts]]
        return nn.functional.normalize(h, dim=-1).numpy().astype(np.float32)

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        if self._cache is not None and self._cached is not None:
            h = self._cached[[self._cache[t] for t in texts]]
        else:
            h = last_token_hidden(self.backbone, self.tokenizer, texts, batch_size=len(texts),
                                  max_length=self.cfg.max_text_tokens, grad=True).float()
        return nn.functional.normalize(self.proj(h), dim=-1)

    def encode(self, texts: Sequence[str], progress: str | None = None) -> np.ndarray:
        was_training = self.training
        self.eval()
        if self._cache is not None and set(texts) <= self._cache.keys():
            with torch.no_grad():
                out = self.forward(list(texts)).numpy().astype(np.float32)
        else:
            out = encode_unique(lambda batch: self.proj(self._hidden(batch)), texts,
                                self.cfg.encode_batch_size, progress)
        self.train(was_training)
        return out

    def _hidden(self, batch: list[str]) -> torch.Tensor:
        return last_token_hidden(self.backbone, self.tokenizer, batch, batch_size=len(batch),
                                 max_length=self.cfg.max_text_tokens).float()

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Only what training changes (LoRA weights, projection): small checkpoints."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v.detach().clone() for k, v in self.state_dict().items() if k in names}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(state) - set(self.state_dict())
        if missing:
            raise ValueError(f"checkpoint has unknown parameters: {sorted(missing)[:3]}")
        self.load_state_dict(state, strict=False)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(self.trainable_state(), folder / "encoder_trainable.pt")


@torch.no_grad()
def encode_unique(fn: Callable[[list[str]], torch.Tensor], texts: Sequence[str], batch_size: int,
                  progress: str | None = None, normalize: bool = True) -> np.ndarray:
    """``fn`` of many texts in batches (L2-normalised unless told not to); identical texts
    (common in category-level catalogues) are encoded once."""
    uniq, inverse = np.unique(np.asarray(texts, dtype=object), return_inverse=True)
    out = []
    for s in tqdm(range(0, len(uniq), batch_size), desc=progress or "encode",
                  disable=progress is None, unit="batch"):
        h = fn(list(uniq[s : s + batch_size])).float()
        out.append(nn.functional.normalize(h, dim=-1) if normalize else h)
    return torch.cat(out).numpy()[inverse].astype(np.float32)


def raw_backbone_embeddings(backbone: nn.Module, tokenizer: Any, texts: Sequence[str],
                            max_tokens: int, batch_size: int,
                            progress: str | None = None) -> np.ndarray:
    """The untrained backbone's pooled text embedding (no projection), L2-normalised: the
    ungrounded baseline of the grounding benchmark and the "without grounding" ablation."""
    return encode_unique(
        lambda batch: last_token_hidden(backbone, tokenizer, batch, batch_size=len(batch),
                                        max_length=max_tokens),
        texts, batch_size, progress,
    )
