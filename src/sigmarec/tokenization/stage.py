"""The tokenization stage: semantic IDs over the item text space, and the hybrid vocabulary."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import numpy as np

from sigmarec.core.atomic import write_json
from sigmarec.core.stage import Stage, StageContext
from sigmarec.errors import StageError
from sigmarec.grounding.artifacts import TEXT_FEATURE_FILES
from sigmarec.tokenization.artifacts import write_vocab
from sigmarec.tokenization.hybrid import HybridVocab
from sigmarec.tokenization.semantic_ids import fit_semantic_ids

log = logging.getLogger("sigmarec")


class TokenizationStage(Stage):
    name: ClassVar[str] = "tokenization"
    requires: ClassVar[tuple[str, ...]] = ("grounding",)
    config_sections: ClassVar[tuple[str, ...]] = ("tokenization",)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        cfg = ctx.config.tokenization
        path = ctx.input("grounding") / TEXT_FEATURE_FILES[cfg.embedding]
        if not path.is_file():
            raise StageError(f"{path}: missing; rerun the grounding stage")
        x = np.load(path)
        sids = fit_semantic_ids(x, cfg.semantic_ids.model_copy(update={"seed": ctx.config.seed}))
        sids.save(ctx.out)
        vocab = HybridVocab(sids.codebook_sizes[: cfg.prefix_levels], cfg.query_token)
        prefixes = vocab.prefix_ids(sids.codes)
        write_vocab(ctx.out, vocab, prefixes, cfg.embedding)
        stats = sids.stats()
        groups = np.bincount(prefixes, minlength=vocab.n_prefixes)
        stats["hybrid_prefix"] = {
            "levels": cfg.prefix_levels,
            "n_prefixes": vocab.n_prefixes,
            "used": int((groups > 0).sum()),
            "largest_group": int(groups.max()),
            "median_group": float(np.median(groups[groups > 0])),
        }
        write_json(ctx.out / "stats.json", stats)
        log.info("semantic IDs: %d prefixes used of %d, largest group %d items, full-SID "
                 "collision rate %.3f", stats["hybrid_prefix"]["used"], vocab.n_prefixes,
                 stats["hybrid_prefix"]["largest_group"], stats["collision_rate"])
        return {"embedding": cfg.embedding, "stats": stats}
