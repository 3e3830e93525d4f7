"""The tasks stage: multi-task SFT samples and per-task evaluation instances.

Writes ``train.parquet`` (SFT samples), ``valid.parquet`` / ``test.parquet`` (evaluation
instances of every supported task, JustForYou identical to the data stage's instances),
``stats.json`` (per task and split), ``prompt.json`` (the run's prompt style, read by every
later stage and by serving) and ``examples.json`` (a few decoded prompts per task).
"""

from __future__ import annotations

import json
import logging
from typing import Any, ClassVar

import numpy as np

from sigmarec.core.atomic import write_json, write_parquet
from sigmarec.core.stage import Stage, StageContext
from sigmarec.data.processed import ProcessedData
from sigmarec.errors import StageError
from sigmarec.tasks.prompt_style import PromptStyle, prompt_style, save_prompt_style
from sigmarec.tasks.sft_data import SFTData, build_sft_data, decode_sample, render_prompt
from sigmarec.tokenization.artifacts import load_vocab

log = logging.getLogger("sigmarec")


def examples(sft: SFTData, data: ProcessedData, vocab: Any, item_prefix: np.ndarray,
             per_task: int, tokenizer: Any = None, *, style: PromptStyle) -> dict[str, Any]:
    """A few samples per task and split, raw fields plus the decoded prompt."""
    out: dict[str, Any] = {}
    for split in ("train", "valid", "test"):
        df = sft.split(split)
        for task in df["task"].unique().tolist() if len(df) else []:
            rows = df[df["task"] == task].head(per_task)
            for r in rows.to_dict("records"):
                p = render_prompt(r, data.items, vocab, item_prefix, tokenizer, style=style)
                out.setdefault(task, {}).setdefault(split, []).append({
                    "user_idx": int(r["user_idx"]),
                    "hist_len": int(r["hist_len"]),
                    "instruction": r["instruction"],
                    "params": json.loads(r["params"]),
                    "targets": [int(t) for t in r["targets"]],
                    "label": p.label,
                    "prompt": p.text,
                    "decoded": decode_sample(r, data.items, vocab, item_prefix, tokenizer,
                                             style=style),
                })
    return out


class TasksStage(Stage):
    name: ClassVar[str] = "tasks"
    requires: ClassVar[tuple[str, ...]] = ("data", "tokenization")
    config_sections: ClassVar[tuple[str, ...]] = ("tasks", "tokenization")

    def run(self, ctx: StageContext) -> dict[str, Any]:
        cfg = ctx.config.tasks
        data = ProcessedData.load(ctx.input("data"))
        vocab, item_prefix = load_vocab(ctx.input("tokenization"))
        if len(item_prefix) != data.n_items:
            raise StageError(
                f"{ctx.input('tokenization')}/item_prefix.npy has {len(item_prefix)} items but the "
                f"data stage has {data.n_items}; rerun tokenization on this data"
            )
        sft = build_sft_data(data, cfg, ctx.config.seed)
        write_parquet(ctx.out / "train.parquet", sft.train)
        write_parquet(ctx.out / "valid.parquet", sft.valid)
        write_parquet(ctx.out / "test.parquet", sft.test)
        write_json(ctx.out / "stats.json", sft.stats)
        style = prompt_style(cfg, sft.resources.profiles)
        save_prompt_style(ctx.out, style)
        if not style.profile_line:
            log.info("tasks: no user has a profile attribute: prompts leave the profile line out")
        write_json(ctx.out / "examples.json",
                   examples(sft, data, vocab, item_prefix, cfg.examples_per_task, style=style))
        for name, st in sft.stats["tasks"].items():
            log.info("task %-10s train %6d  valid %5d  test %5d", name, st["train"]["n"],
                     st["valid"]["n"], st["test"]["n"])
        return {"totals": sft.stats["totals"], "skipped": sft.skipped,
                "seconds": sft.stats["seconds"]}
