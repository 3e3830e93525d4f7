"""How the GR baselines write an item: a sequence of new vocabulary tokens.

* GR(SID) (TIGER / LC-Rec): the item's full semantic ID, one token per level (``<a_3><b_7><c_1>``),
  plus, with ``dedup``, TIGER's extra level ``<d_k>`` that numbers the items sharing that full
  SID (codebook size = the largest such group), so every item has its own sequence.
* GR(ID): one token per item, ``<item_{idx}>``.

An :class:`ItemTokens` holds the new token strings and each item's sequence as indices into
them; the model maps those indices to vocabulary ids once the tokens are added.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sigmarec.tokenization.hybrid import LEVEL_LETTERS, prefix_token


@dataclass
class ItemTokens:
    """``tokens``: the new vocabulary entries; ``seqs[i]``: item ``i``'s token indices (n, L)."""

    name: str
    tokens: list[str]
    seqs: np.ndarray
    # Items sharing one sequence, best first, when sequences are not unique (SID without dedup):
    # generation expands a generated sequence into these items.
    popularity: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.seqs = np.ascontiguousarray(self.seqs, dtype=np.int64)
        if self.seqs.ndim != 2 or self.seqs.shape[1] < 1:
            raise ValueError(f"item token sequences must be (n_items, L>=1), got {self.seqs.shape}")
        if self.seqs.size and (self.seqs.min() < 0 or self.seqs.max() >= len(self.tokens)):
            raise ValueError("item token sequences index outside the token list")

    @property
    def n_items(self) -> int:
        return int(self.seqs.shape[0])

    @property
    def length(self) -> int:
        """Tokens per item (the number of decoding steps)."""
        return int(self.seqs.shape[1])

    def item_text(self, item: int) -> str:
        """The item as it appears in a prompt or a label."""
        return "".join(self.tokens[j] for j in self.seqs[int(item)])

    def unique(self) -> bool:
        return len(np.unique(self.seqs, axis=0)) == self.n_items

    def stats(self) -> dict[str, int | float]:
        _, counts = np.unique(self.seqs, axis=0, return_counts=True)
        return {"new_tokens": len(self.tokens), "tokens_per_item": self.length,
                "distinct_sequences": int(counts.size), "largest_group": int(counts.max())}


def sid_tokens(codes: np.ndarray, codebook_sizes: list[int], dedup: bool = True,
               popularity: np.ndarray | None = None) -> ItemTokens:
    """GR(SID) sequences from semantic-ID ``codes`` (n_items, levels).

    The dedup code of an item is its rank by item index among the items with the same full SID
    (deterministic and independent of the training counts). ``popularity`` orders the items of
    a shared sequence when ``dedup`` is off.
    """
    codes = np.asarray(codes, dtype=np.int64)
    sizes = [int(k) for k in codebook_sizes]
    if codes.ndim != 2 or codes.shape[1] != len(sizes):
        raise ValueError(f"codes {codes.shape} do not match {len(sizes)} codebook sizes")
    if len(sizes) + int(dedup) > len(LEVEL_LETTERS):
        raise ValueError(f"{len(sizes)} SID levels leave no letter for the dedup level")
    tokens = [prefix_token(lv, c) for lv, k in enumerate(sizes) for c in range(k)]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    seqs = codes + offsets[None, :]
    if dedup:
        _, inverse = np.unique(codes, axis=0, return_inverse=True)
        inverse = inverse.ravel()
        order = np.argsort(inverse, kind="stable")  # by group, then item index
        first = np.searchsorted(inverse[order], inverse[order], side="left")
        rank = np.empty(len(codes), dtype=np.int64)
        rank[order] = np.arange(len(codes)) - first
        size = int(rank.max()) + 1 if len(codes) else 1
        dedup_ids = len(tokens) + rank
        tokens += [prefix_token(len(sizes), j) for j in range(size)]
        seqs = np.concatenate([seqs, dedup_ids[:, None]], axis=1)
    return ItemTokens("gr_sid", tokens, seqs, popularity)


def id_tokens(n_items: int) -> ItemTokens:
    """GR(ID): one new token ``<item_{idx}>`` per item."""
    return ItemTokens("gr_id", [f"<item_{i}>" for i in range(n_items)],
                      np.arange(n_items, dtype=np.int64)[:, None])
