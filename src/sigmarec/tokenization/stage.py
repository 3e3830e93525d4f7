"""The tokenization stage: semantic IDs over the item text space, and the hybrid vocabulary."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import numpy as np

from sigmarec.core.atomic import write_json
from sigmarec.core.stage import Stage, StageContext
from sigmarec.errors import StageError
from sigmarec.tokenization.hybrid import HybridVocab
from sigmarec.tokenization.semantic_ids import fit_semantic_ids

log = logging.getLogger("sigmarec")

EMBEDDING_FILES = {"grounded": "v_text.npy", "ungrounded": "v_text_ungrounded.npy"}


class TokenizationStage(Stage):
    name: ClassVar[str] = "tokenization"
    requires: ClassVar[tuple[str, ...]] = ("grounding",)
    config_sections: ClassVar[tuple[str, ...]] = ("tokenization",)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        cfg = ctx.config.tokenization
        path = ctx.input("grounding") / EMBEDDING_FILES[cfg.embedding]
        if not path.is_file():
            raise StageError(f"{path}: missing; rerun the grounding stage")
        x = np.load(path)
        sids = fit_semantic_ids(x, cfg.semantic_ids.model_copy(update={"seed": ctx.config.seed}))
        sids.save(ctx.out)
        vocab = HybridVocab(sids.codebook_sizes[: cfg.prefix_levels], cfg.query_token)
        prefixes = vocab.prefix_ids(sids.codes)
        np.save(ctx.out / "item_prefix.npy", prefixes)
        stats = sids.stats()
        groups = np.bincount(prefixes, minlength=vocab.n_prefixes)
        stats["hybrid_prefix"] = {
            "levels": cfg.prefix_levels,
            "n_prefixes": vocab.n_prefixes,
            "used": int((groups > 0).sum()),
            "largest_group": int(groups.max()),
            "median_group": float(np.median(groups[groups > 0])),
        }
        write_json(ctx.out / "vocab.json", {
            "tokens": vocab.tokens,
            "prefix_codebook_sizes": vocab.codebook_sizes,
            "query_token": vocab.query_token,
            "embedding": cfg.embedding,
        })
        write_json(ctx.out / "stats.json", stats)
        log.info("semantic IDs: %d prefixes used of %d, largest group %d items, full-SID "
                 "collision rate %.3f", stats["hybrid_prefix"]["used"], vocab.n_prefixes,
                 stats["hybrid_prefix"]["largest_group"], stats["collision_rate"])
        return {"embedding": cfg.embedding, "stats": stats}
