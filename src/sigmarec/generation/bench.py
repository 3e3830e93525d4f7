"""``sigma bench generate``: SIGMA's three steps against GR(SID) beam search and a bare forward.

All three run in one process, on the same machine, over the same evaluation instances (each
method renders them its own way: SIGMA writes an item as prefix + soft token, GR(SID) as its
full semantic ID), so the ratios are meaningful where absolute times on a shared machine are
not. Measured:

* latency: one request at a time, p50 / p95 over the requests;
* throughput: users per second with ``batch_size`` requests per call;
* the floor: one forward pass over SIGMA's prompts (what any LLM recommender pays to read the
  request), i.e. SIGMA's step 1 without the rest;
* peak memory: CUDA peak allocation per method on a GPU; on CPU the process's peak RSS after each
  method (monotonic, so later methods show only what they add beyond earlier peaks).

GR(SID) uses the trained weights of the run's ``gr_baselines`` stage when they exist, else an
untrained model of the same architecture: decoding cost does not depend on the weights (the
beam width and the number of steps are fixed), which is stated in the output.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil
import torch

from sigmarec.config import SigmaConfig

log = logging.getLogger("sigmarec")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    info = psutil.Process().memory_info()
    return float(getattr(info, "peak_wset", 0) or _ru_maxrss_mb() or info.rss / 2**20)


def _ru_maxrss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def time_calls(fn: Callable[[Sequence[int]], Any], n: int, batch: int,
               device: torch.device, warmup: int = 1) -> dict[str, float]:
    """Latency (batch 1) percentiles and throughput (``batch`` per call) of ``fn(rows)``."""
    for w in range(warmup):
        fn([w % n])
    lat = []
    for r in range(n):
        _sync(device)
        t = time.perf_counter()
        fn([r])
        _sync(device)
        lat.append(time.perf_counter() - t)
    _sync(device)
    t = time.perf_counter()
    for s in range(0, n, batch):
        fn(list(range(s, min(n, s + batch))))
    _sync(device)
    total = time.perf_counter() - t
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return {"p50_ms": float(np.percentile(lat, 50) * 1e3),
            "p95_ms": float(np.percentile(lat, 95) * 1e3),
            "users_per_s": n / total}


def bench_generate(cfg: SigmaConfig, run_dir: Path, n_users: int, batch_size: int
                   ) -> pd.DataFrame:
    """The benchmark table (one row per method) for a run whose training stage has finished."""
    from sigmarec.data.processed import ProcessedData
    from sigmarec.generation.fusion import fuse
    from sigmarec.generation.run_model import load_run_model
    from sigmarec.tasks.text_match import data_matcher
    from sigmarec.training.stage import to_examples

    run_dir = Path(run_dir)
    test = pd.read_parquet(run_dir / "tasks" / "test.parquet")
    rng = np.random.default_rng(0)
    inst = test.iloc[np.sort(rng.choice(len(test), min(n_users, len(test)), replace=False))]
    g = cfg.generation
    k, n = g.k_prefixes, cfg.eval.top_n
    run = load_run_model(run_dir, k, g.m_per_prefix)
    model, decoder, vocab, item_prefix = run.model, run.decoder, run.vocab, run.item_prefix
    device = model.item_prefix.device
    data = ProcessedData.load(run_dir / "data")
    matcher = data_matcher(model.cfg, data, run.config.tasks)
    sigma_ex = to_examples(inst, model, vocab, item_prefix, with_target=False, matcher=matcher,
                           style=run.prompt)
    n = len(sigma_ex)
    rows: list[dict[str, Any]] = []

    def bare(r: Sequence[int]) -> None:
        b = decoder.batch([sigma_ex[i] for i in r])
        model.prefix_logprobs(b)

    def sigma(r: Sequence[int]) -> None:
        b = decoder.batch([sigma_ex[i] for i in r])
        fuse(decoder.candidates(b, cfg.eval.top_n), g.fusion, g.tau, cfg.eval.top_n)

    prompt_tokens = float(np.mean([len(e.input_ids) for e in sigma_ex]))
    with torch.no_grad():
        for name, fn in (("bare forward (SIGMA prompts)", bare),
                         (f"SIGMA three steps (K={k}, M={g.m_per_prefix})", sigma)):
            rows.append({"method": name, **time_calls(fn, n, batch_size, device),
                         "peak_mb": _peak_mb(device), "prompt_tokens": prompt_tokens})
            log.info("bench: %s", rows[-1])
    rows.append(_bench_gr(cfg, run_dir, inst, k, batch_size))
    df = pd.DataFrame(rows).set_index("method")
    base = df.iloc[1]
    df["latency_vs_sigma"] = df["p50_ms"] / base["p50_ms"]
    df["throughput_vs_sigma"] = df["users_per_s"] / base["users_per_s"]
    return df


def _bench_gr(cfg: SigmaConfig, run_dir: Path, inst: pd.DataFrame, k: int,
              batch_size: int) -> dict[str, Any]:
    from sigmarec.gr.decoding import ItemTrie, gr_recommend
    from sigmarec.gr.items import sid_tokens
    from sigmarec.gr.model import GRExample, build_gr_model
    from sigmarec.gr.stage import _tokenise, gr_model_config
    from sigmarec.tokenization.artifacts import load_vocab
    from sigmarec.tokenization.semantic_ids import SemanticIds

    sids = SemanticIds.load(run_dir / "tokenization")
    items = sid_tokens(sids.codes, sids.codebook_sizes, cfg.gr.dedup_level,
                       np.arange(sids.n_items))
    torch.manual_seed(cfg.seed)
    model, _ = build_gr_model(cfg.backbone, gr_model_config(cfg), items)
    trained = run_dir / "gr_baselines" / "models" / "gr_sid"
    weights = "trained"
    if trained.is_dir():
        model.load_trainable(trained)
    else:
        weights = "untrained (same architecture; decoding cost does not depend on weights)"
    model.eval()
    vocab, item_prefix = load_vocab(run_dir / "tokenization")
    ids = _tokenise(inst, model.tokenizer, items, vocab, item_prefix)
    trie = ItemTrie(model.item_seqs.numpy(), model.vocab_rows)
    collate = model.collator()
    device = next(model.parameters()).device

    def gr(r: Sequence[int]) -> None:
        batch = collate([GRExample(ids[i], 0) for i in r], with_labels=False)
        gr_recommend(model, {kk: v.to(device) for kk, v in batch.items()}, k, trie=trie)

    with torch.no_grad():
        out = {"method": f"GR(SID) constrained beam search (beams={k})",
               **time_calls(gr, len(ids), batch_size, device),
               "peak_mb": _peak_mb(device),
               "prompt_tokens": float(np.mean([len(x) for x in ids])), "weights": weights}
    log.info("bench: %s", out)
    return out
