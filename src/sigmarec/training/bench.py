"""``sigma bench sft``: seconds per SFT step of the run's real samples under each precision.

Same model, samples, batch and objective as the training stage; each precision trains a fresh
model for a few steps (the first is left out: it carries the allocator warm-up). Reported as
ratios to fp32 in the same process, because the machine is shared and an absolute time is not
stable. To see what a CPU without native bf16 would do on one that has it, run the command with
``ATEN_CPU_CAPABILITY=avx2`` (torch's kernels then stop at AVX2, and ``auto`` resolves to fp32).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from sigmarec.config import SigmaConfig
from sigmarec.model.sigma import build_sigma_model
from sigmarec.tasks.channels import active_channels
from sigmarec.training.loop import train_sigma
from sigmarec.training.precision import detect_caps, resolve_precision


def bench_sft(cfg: SigmaConfig, run_dir: Path, precisions: list[str], steps: int = 6
              ) -> pd.DataFrame:
    """One row per precision: resolved precision, s/step, tokens/s and the ratio to fp32."""
    from sigmarec.data.processed import ProcessedData
    from sigmarec.grounding.artifacts import load_item_features
    from sigmarec.tasks.prompt_style import load_prompt_style
    from sigmarec.tasks.text_match import data_matcher
    from sigmarec.tokenization.artifacts import load_vocab
    from sigmarec.training.stage import to_examples

    run_dir = Path(run_dir)
    vocab, item_prefix = load_vocab(run_dir / "tokenization")
    feats = load_item_features(run_dir / "grounding", run_dir / "baselines",
                               cfg.tokenization.embedding)
    train_df = pd.read_parquet(run_dir / "tasks" / "train.parquet")
    rows: list[dict[str, Any]] = []
    examples = None
    for prec in precisions:
        torch.manual_seed(cfg.seed)
        model, _ = build_sigma_model(cfg.backbone, cfg.model, vocab, feats, item_prefix)
        data = ProcessedData.load(Path(run_dir) / "data")
        for ch in active_channels(cfg.model):
            ch.prepare(model, data.train_item_counts)
        if examples is None:
            matcher = data_matcher(cfg.model, data, cfg.tasks)
            examples = to_examples(train_df, model, vocab, item_prefix, matcher=matcher,
                                   style=load_prompt_style(run_dir / "tasks"))
        tcfg = cfg.training.model_copy(update={
            "steps": steps, "mixed_precision": prec, "eval_at_end": False,
            "warmup_ratio": 0.0, "time_budget_s": None})
        t0 = time.perf_counter()
        res = train_sigma(model, examples, tcfg, seed=cfg.seed, progress=False)
        wall = time.perf_counter() - t0
        secs = [r["seconds"] for r in res.history[1:]] or [r["seconds"] for r in res.history]
        toks = [r["tokens"] for r in res.history[1:]] or [r["tokens"] for r in res.history]
        resolved, reason = resolve_precision(prec, "cpu" if not torch.cuda.is_available()
                                             else "cuda", detect_caps())
        rows.append({"requested": prec, "resolved": resolved, "reason": reason,
                     "s_per_step": float(np.mean(secs)),
                     "tokens_per_s": float(np.sum(toks) / np.sum(secs)), "wall_s": wall})
        del model
    df = pd.DataFrame(rows).set_index("requested")
    ref = df.loc[df["resolved"] == "no", "s_per_step"]
    df["vs_fp32"] = df["s_per_step"] / float(ref.iloc[0]) if len(ref) else np.nan
    return df
