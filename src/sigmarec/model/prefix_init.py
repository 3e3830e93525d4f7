"""Where the SIGMA model's prefix tokens start: the shared mean row (``shared``), or the mean row
plus a direction per code from what its items are about (the items' soft tokens, their
untrained-backbone text states, or random). A mixin of
:class:`~sigmarec.model.sigma.SigmaModel`."""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from sigmarec.model.codes import eval_mode
from sigmarec.tokenization.hybrid import flat_to_codes


class PrefixInit:
    """The prefix-initialisation methods of the SIGMA model."""

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
        with eval_mode(self):
            v = torch.cat([self.item_embeddings(idx).float() for idx in
                           torch.arange(self.n_items, device=self.item_prefix.device).split(8192)])
        codes = flat_to_codes(self.item_prefix, self.codebook_sizes)
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
