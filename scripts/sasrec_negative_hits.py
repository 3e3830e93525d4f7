"""How often a uniform BCE negative hits its own training window (or the positive) on a run's
data: the share of targets that SASRec's "unseen" sampler would redraw.

    python scripts/sasrec_negative_hits.py runs/beauty [--max-len 50] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sigmarec.baselines.sasrec.train import training_windows
from sigmarec.data.processed import ProcessedData


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--max-len", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    data = ProcessedData.load(args.run / "data")
    w = torch.from_numpy(training_windows(data.train_sequences(), args.max_len))
    inp, tgt = w[:, :-1], w[:, 1:]
    valid = (tgt != 0) & (inp != 0)
    gen = torch.Generator().manual_seed(args.seed)
    neg = torch.randint(1, data.n_items + 1, tgt.shape, generator=gen)
    in_window = (neg.unsqueeze(-1) == w.unsqueeze(1)).any(-1)[valid]
    is_positive = (neg == tgt)[valid]
    print(f"windows {len(w)}, targets {int(valid.sum())}, items {data.n_items}")
    print(f"negative in its window: {in_window.float().mean().item():.5f}")
    print(f"negative = the positive: {is_positive.float().mean().item():.6f}")


if __name__ == "__main__":
    main()
