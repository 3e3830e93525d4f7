"""The gr_baselines stage: train GR(SID) and/or GR(ID) and rank every task instance with them.

For each enabled baseline: build the item tokens (semantic IDs from the tokenization stage,
plus the dedup level; or one token per item), render the tasks stage's SFT samples with the
same chat prompt as SIGMA (only the item representation differs), train with SIGMA's loop and
budget (``training`` section; ``gr.steps``/``per_device_batch_size``/``lr`` override), then
decode every row of ``tasks/{valid,test}.parquet`` by constrained beam search.

Writes ``rankings/{name}_{split}.parquet`` (instance_id, items, scores; ``gr.num_beams`` distinct
items, best first), ``models/{name}/`` (LoRA + new-token rows) and a summary. With
``gr.enabled`` empty (the default) it writes nothing and returns at once.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd

from sigmarec.core.stage import Stage, StageContext
from sigmarec.errors import ConfigError, DataError, StageError
from sigmarec.tasks.prompt_style import PromptStyle, load_prompt_style

if TYPE_CHECKING:
    from sigmarec.config import SigmaConfig
    from sigmarec.model.config import ModelConfig

log = logging.getLogger("sigmarec")

SPLITS = ("valid", "test")


def fill_popular(items: np.ndarray, scores: np.ndarray, popular: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Replace the -1 slots of each row with the most popular items not yet in it (score
    -inf); returns (items, scores, rows filled, slots filled)."""
    items, scores = items.copy(), scores.copy()
    rows = slots = 0
    for r in range(len(items)):
        hole = items[r] < 0
        if not hole.any():
            continue
        have = set(items[r][~hole].tolist())
        extra = [int(i) for i in popular[: len(have) + int(hole.sum())] if int(i) not in have]
        items[r][hole] = extra[: int(hole.sum())]
        scores[r][hole] = -np.inf
        rows, slots = rows + 1, slots + int(hole.sum())
    return items, scores, rows, slots


def gr_model_config(cfg: SigmaConfig) -> ModelConfig:
    """SIGMA's model settings (LoRA and the rest) with GR's own dense-loss weight, if set."""
    g = cfg.gr
    if g.dense_weight is None:
        return cfg.model
    return cfg.model.model_copy(update={"dense_weight": g.dense_weight})


def _read(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise StageError(f"{path} not found; rerun the tasks stage")
    return pd.read_parquet(path)


class GRBaselinesStage(Stage):
    name: ClassVar[str] = "gr_baselines"
    requires: ClassVar[tuple[str, ...]] = ("data", "tokenization", "tasks")
    config_sections: ClassVar[tuple[str, ...]] = ("backbone", "model", "training", "gr", "eval")

    def run(self, ctx: StageContext) -> dict[str, Any]:
        g = ctx.config.gr
        if not g.enabled:
            return {"enabled": [], "note": "gr.enabled is empty: no GR baseline was trained"}
        k_max = max(ctx.config.eval.ks)
        if g.num_beams < k_max:
            raise ConfigError(f"gr.num_beams ({g.num_beams}) must be >= max(eval.ks) ({k_max}): "
                              "the beams are the ranked list")
        from sigmarec.data.processed import ProcessedData
        from sigmarec.tokenization.artifacts import load_vocab

        data = ProcessedData.load(ctx.input("data"))
        counts = data.train_item_counts
        popular = np.argsort(-counts, kind="stable")
        vocab, item_prefix = load_vocab(ctx.input("tokenization"))
        frames = {s: _read(ctx.input("tasks") / f"{s}.parquet") for s in ("train", *SPLITS)}
        if frames["train"].empty:
            raise StageError(f"{ctx.input('tasks')}/train.parquet holds no SFT samples")
        summary: dict[str, Any] = {"enabled": list(g.enabled), "num_beams": g.num_beams}
        for name in dict.fromkeys(g.enabled):
            items = self._items(ctx, name, counts, data.n_items)
            summary[name] = _train_and_rank(ctx, name, items, frames, vocab, item_prefix,
                                            popular)
        return summary

    def _items(self, ctx: StageContext, name: str, counts: np.ndarray, n_items: int) -> Any:
        from sigmarec.gr.items import id_tokens, sid_tokens
        from sigmarec.tokenization.semantic_ids import SemanticIds

        if name == "gr_id":
            return id_tokens(n_items)
        try:
            sids = SemanticIds.load(ctx.input("tokenization"))
        except DataError as e:
            raise StageError(f"gr_sid needs the semantic IDs: {e}") from None
        if sids.n_items != n_items:
            raise StageError(f"{ctx.input('tokenization')}/semantic_ids.npz has {sids.n_items} "
                             f"items but the data stage has {n_items}; rerun tokenization")
        priority = np.argsort(-counts, kind="stable")
        return sid_tokens(sids.codes, sids.codebook_sizes, ctx.config.gr.dedup_level, priority)


def _tokenise(df: pd.DataFrame, tok: Any, items: Any, vocab: Any, item_prefix: np.ndarray,
              style: PromptStyle) -> list[list[int]]:
    from sigmarec.tasks.sft_data import render_prompt

    texts = [render_prompt(r, None, vocab, item_prefix, tok, style=style,
                           item_text=items.item_text).text for r in df.itertuples(index=False)]
    return tok(texts, add_special_tokens=False)["input_ids"] if texts else []


def _train_and_rank(ctx: StageContext, name: str, items: Any, frames: dict[str, pd.DataFrame],
                    vocab: Any, item_prefix: np.ndarray, popular: np.ndarray) -> dict[str, Any]:
    import torch

    from sigmarec.gr.decoding import ItemTrie, gr_recommend
    from sigmarec.gr.model import GRExample, build_gr_model
    from sigmarec.training.loop import train_sigma

    cfg, g = ctx.config, ctx.config.gr
    torch.manual_seed(cfg.seed)  # the same LoRA init whichever baselines run before this one
    model, facts = build_gr_model(cfg.backbone, gr_model_config(cfg), items)
    tok = model.tokenizer
    style = load_prompt_style(ctx.input("tasks"))  # SIGMA's prompts, items written as text
    train_df = frames["train"]
    train_ex = [GRExample(ids, int(t)) for ids, t in
                zip(_tokenise(train_df, tok, items, vocab, item_prefix, style), train_df["target"],
                    strict=True)]
    valid_df = frames["valid"]
    rng = np.random.default_rng(cfg.seed)
    n_valid = min(len(valid_df), cfg.training.max_valid_examples or 256)
    vsub = valid_df.iloc[np.sort(rng.choice(len(valid_df), n_valid, replace=False))]
    # An evaluation instance has no single target: its first target is the validation label.
    valid_ex = [GRExample(ids, int(np.asarray(t)[0])) for ids, t in
                zip(_tokenise(vsub, tok, items, vocab, item_prefix, style), vsub["targets"],
                    strict=True)]
    over = {"steps": g.steps, "per_device_batch_size": g.per_device_batch_size, "lr": g.lr}
    tcfg = cfg.training.model_copy(update={k: v for k, v in over.items() if v is not None})
    trie = ItemTrie(model.item_seqs.numpy(), model.vocab_rows, popular)

    def validate(m: Any, step: int) -> dict[str, float]:
        # Only when a callback metric selects the weights; valid_loss needs no decoding.
        if tcfg.select_metric == "valid_loss":
            return {}
        sub = valid_ex[:64]
        hits = []
        for s in range(0, len(sub), g.generate_batch_size):
            chunk = sub[s:s + g.generate_batch_size]
            top, _ = gr_recommend(m, m.collator()(chunk, with_labels=False), 10, trie=trie)
            tg = [np.asarray(t) for t in vsub["targets"].iloc[s:s + len(chunk)]]
            hits += [bool(np.isin(row, t).any()) for row, t in zip(top, tg, strict=True)]
        return {"valid_hr10": float(np.mean(hits))}

    log.info("gr %s: %d new tokens, %d per item, %d SFT samples", name, len(items.tokens),
             items.length, len(train_ex))
    scratch = ctx.scratch / name if ctx.scratch is not None else None
    result = train_sigma(model, train_ex, tcfg, seed=cfg.seed, checkpoint_dir=scratch,
                         valid_examples=valid_ex, validate_fn=validate,
                         output_dir=ctx.out / "models" / name)
    out: dict[str, Any] = {"items": items.stats(), "backbone": facts,
                           "train_samples": len(train_ex), **result.summary(), "splits": {}}
    (ctx.out / "rankings").mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        df = frames[split]
        t0 = time.perf_counter()
        ids = _tokenise(df, tok, items, vocab, item_prefix, style)
        order = np.argsort([len(x) for x in ids], kind="stable")  # less padding per batch
        top = np.full((len(df), g.num_beams), -1, dtype=np.int64)
        sc = np.full((len(df), g.num_beams), -np.inf, dtype=np.float32)
        collate = model.collator()
        t_gen = time.perf_counter()
        for s in range(0, len(order), g.generate_batch_size):
            rows = order[s:s + g.generate_batch_size]
            batch = collate([GRExample(ids[r], 0) for r in rows], with_labels=False)
            top[rows], sc[rows] = gr_recommend(model, batch, g.num_beams, trie=trie)
        gen_s = time.perf_counter() - t_gen
        top, sc, n_rows, n_slots = fill_popular(top, sc, popular)
        ranking = pd.DataFrame({"instance_id": df["instance_id"].astype(np.int64).to_numpy(),
                                "items": list(top), "scores": list(sc.astype(np.float64))})
        from sigmarec.core.atomic import write_parquet

        write_parquet(ctx.out / "rankings" / f"{name}_{split}.parquet", ranking)
        out["splits"][split] = {
            "instances": len(df), "generate_seconds": round(gen_s, 2),
            "users_per_s": round(len(df) / gen_s, 2) if gen_s > 0 else None,
            "total_seconds": round(time.perf_counter() - t0, 2),
            "filled_rows": n_rows, "filled_slots": n_slots,
        }
        log.info("gr %s %s: %d instances in %.1fs (%.1f/s), %d lists filled from popularity",
                 name, split, len(df), gen_s, len(df) / max(gen_s, 1e-9), n_rows)
    del model
    return out
