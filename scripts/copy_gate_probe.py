"""Inference-only probe (docs/experiments.md, round 5): a trained repeat-aware model's quick-decode
figures on the stratified validation subset as its copy gates are offset.

    python scripts/copy_gate_probe.py RUN_DIR P,I [P,I ...]   # pre-softplus offsets (prefix, item)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from sigmarec.config import load_config
from sigmarec.data.processed import ProcessedData
from sigmarec.generation.run_model import model_dir, read_run_inputs
from sigmarec.model.sigma import load_sigma_model
from sigmarec.tasks.text_match import data_matcher
from sigmarec.training.diagnostics import decode_diagnostics
from sigmarec.training.stage import to_examples

KEYS = ("valid_prefix_ntp", "prefix_hit@10", "valid_hr10", "in_prefix_hit@10",
        "valid_hr10_JustForYou")


def main(run: Path, offsets: list[str]) -> None:
    cfg = load_config("default", overrides=["model.repeat_aware=true"])
    inputs = read_run_inputs(run)
    vocab, item_prefix = inputs.vocab, inputs.item_prefix
    model = load_sigma_model(model_dir(run), inputs.config.backbone, inputs.item_features,
                             item_prefix)
    valid = pd.read_parquet(run / "tasks" / "valid.parquet")
    # The training stage's subset: same seed, same stratification by task.
    rng = np.random.default_rng(cfg.seed)
    groups = valid.groupby("task").indices
    per = max(1, (cfg.training.max_valid_examples or 256) // len(groups))
    keep = np.concatenate([rng.choice(ix, min(per, len(ix)), replace=False)
                           for _, ix in sorted(groups.items())])
    sub = valid.iloc[np.sort(keep)]
    data = ProcessedData.load(run / "data")
    matcher = data_matcher(model.cfg, data, inputs.config.tasks)
    examples = to_examples(sub, model, vocab, item_prefix, with_target=False, matcher=matcher,
                           style=inputs.prompt)
    targets = [np.asarray(t) for t in sub["targets"]]
    base = model.repeat.proj.bias.detach().clone()
    print("learned gate biases (softplus):", torch.nn.functional.softplus(base).tolist())
    for spec in offsets:
        p, i = (float(x) for x in spec.split(","))
        with torch.no_grad():
            model.repeat.proj.bias.copy_(base + torch.tensor([p, p, i, i]))
        out = decode_diagnostics(model, examples, targets, sub["task"].tolist())
        print(spec, json.dumps({k: round(out[k], 4) for k in KEYS}), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
