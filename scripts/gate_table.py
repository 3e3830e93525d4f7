"""Inference-only probe (docs/experiments.md, round 10): a trained repeat-aware model's copy
gates per task, on the first N validation prompts of each task, and how far the hidden state the
gates read differs between tasks.

    python scripts/gate_table.py RUN_DIR [N]

The model is loaded with the run's own config (its training manifest).

Columns: the gates in the model's order (prefix channels, then item channels: sequence,
context, then each of counts / match / rarity / novelty the model reads).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import torch

from sigmarec.data.processed import ProcessedData
from sigmarec.generation.run_model import model_dir, read_run_inputs
from sigmarec.model.sigma import load_sigma_model, prompt_args
from sigmarec.tasks.text_match import data_matcher
from sigmarec.training.stage import to_examples


def main(run: Path, per_task: int) -> None:
    torch.set_num_threads(1)
    inputs = read_run_inputs(run)
    vocab, item_prefix = inputs.vocab, inputs.item_prefix
    model = load_sigma_model(model_dir(run), inputs.config.backbone, inputs.item_features,
                             item_prefix).eval()
    valid = pd.read_parquet(run / "tasks" / "valid.parquet")
    sub = valid.groupby("task").head(per_task)
    data = ProcessedData.load(run / "data")
    examples = to_examples(sub, model, vocab, item_prefix, with_target=False,
                           matcher=data_matcher(model.cfg, data, inputs.config.tasks),
                           style=inputs.prompt)
    collate = model.collator()
    states, means = [], []
    with torch.no_grad():
        for task in sorted(sub["task"].unique()):
            rows = [examples[i] for i, t in enumerate(sub["task"]) if t == task]
            batch = collate(rows, with_labels=False)
            _, cache = model.prefix_logprobs(**prompt_args(batch))
            h = model(batch["input_ids"], batch["attention_mask"], batch["item_ids"])["hidden"]
            states.append(h[:, -1].float())
            means.append(cache.repeat_gates.mean(0))
            print(f"{task:<11}", " ".join(f"{g:.2f}" for g in means[-1].tolist()))
    within = torch.stack([s.std(0) for s in states]).mean().item()
    between = torch.stack([s.mean(0) for s in states]).std(0).mean().item()
    spread = torch.stack(means).max(0).values - torch.stack(means).min(0).values
    print(f"gate spread over tasks: max {spread.max().item():.3f}")
    print(f"hidden state at the gates: norm {torch.cat(states).norm(dim=1).mean().item():.1f}, "
          f"per-dimension sd within a task {within:.3f}, between task means {between:.3f}")


if __name__ == "__main__":
    args = sys.argv[1:]
    main(Path(args[0]), int(args[1]) if len(args) > 1 else 12)
