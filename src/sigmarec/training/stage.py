"""The SFT stage: render the tasks stage's samples into token ids, build SigmaModel over the
frozen ID tower and grounded text embeddings, and train it with the accelerate loop."""

from __future__ import annotations

import logging
import time
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from sigmarec.core.atomic import write_json
from sigmarec.core.stage import Stage, StageContext
from sigmarec.data.processed import ProcessedData
from sigmarec.errors import StageError
from sigmarec.grounding.artifacts import UNGROUNDED_FILE, load_item_features
from sigmarec.model.batch import SFTExample, gate_task_id
from sigmarec.model.sigma import SigmaModel, build_sigma_model
from sigmarec.tasks.channels import ExampleContext, active_channels, collated_channels
from sigmarec.tasks.prompt_style import PromptStyle, load_prompt_style
from sigmarec.tasks.sft_data import render_prompt
from sigmarec.tasks.text_match import InstructionMatcher, data_matcher
from sigmarec.tokenization.artifacts import load_vocab
from sigmarec.tokenization.hybrid import HybridVocab
from sigmarec.training.diagnostics import (
    decode_diagnostics,
    level0_codes,
    prefix_prior,
    reference_ntp,
)
from sigmarec.training.loop import train_sigma

log = logging.getLogger("sigmarec")


def prefix_text_states(ctx: StageContext, vocab: HybridVocab, hidden: int) -> list[np.ndarray]:
    """Per prefix level, the mean untrained-backbone text state of the items with each code."""
    from sigmarec.tokenization.semantic_ids import SemanticIds

    path = ctx.input("grounding") / UNGROUNDED_FILE
    if not path.is_file():
        raise StageError(f"{path}: missing; model.prefix_init item_text needs the grounding "
                         "stage's ungrounded text states (or set model.prefix_init: shared)")
    states = np.load(path)
    if states.shape[1] != hidden:
        raise StageError(f"{path}: states have size {states.shape[1]} but the backbone's hidden "
                         f"size is {hidden}; was grounding run with another backbone?")
    codes = SemanticIds.load(ctx.input("tokenization")).codes
    out = []
    for lv, size in enumerate(vocab.codebook_sizes):
        sums = np.zeros((size, hidden))
        np.add.at(sums, codes[:, lv], states)
        counts = np.bincount(codes[:, lv], minlength=size)[:, None]
        out.append((sums / np.maximum(counts, 1)).astype(np.float32))
    return out


def _task_id(row: Any, required: bool) -> int:
    """A row's task as a row of GATE_TASKS; -1 where the model does not read it."""
    task = getattr(row, "task", None)
    if task is None or (isinstance(task, float) and np.isnan(task)):
        if required:
            raise ValueError("this model offsets its copy gates per task (model.task_gates) but "
                             "the prompt rows have no task column")
        return -1
    return gate_task_id(task) if required else -1


def to_examples(samples: pd.DataFrame, model: SigmaModel, vocab: HybridVocab,
                item_prefix: np.ndarray, with_target: bool = True,
                matcher: InstructionMatcher | None = None, *,
                style: PromptStyle) -> list[SFTExample]:
    """Render and tokenise samples (one row each) into the model's examples, in the run's prompt
    ``style`` (:func:`~sigmarec.tasks.prompt_style.load_prompt_style` of its tasks stage); with
    ``matcher`` (:func:`text_matcher`; required by a model with ``model.text_match``), each
    example also gets its instruction's text matches."""
    out = []
    tok = model.tokenizer
    if matcher is None and model.cfg.text_match:
        raise ValueError("this model reads the instruction's text match (model.text_match): "
                         "pass to_examples(..., matcher=text_matcher(cfg.model, items))")
    if matcher is not None and matcher.n_items != len(item_prefix):
        raise ValueError(f"the text matcher was fitted on {matcher.n_items} items but the "
                         f"catalogue has {len(item_prefix)}")
    # Every channel's lists, in registry order (a channel may read the ones before it).
    ctx = ExampleContext(model.cfg, matcher, {})
    for ch in collated_channels():
        ctx.lists[ch.name] = ch.example_lists(samples, ctx)
    for r, row in enumerate(samples.itertuples(index=False)):
        task_id = _task_id(row, model.cfg.task_gates)
        rp = render_prompt(row, None, vocab, item_prefix, tok, style=style)
        ids = tok(rp.text, add_special_tokens=False)["input_ids"]
        target = int(row.target) if with_target else int(np.asarray(row.targets)[0])
        positives = tuple(int(t) for t in np.asarray(row.targets)) if with_target else ()
        out.append(SFTExample(input_ids=ids, item_ids=list(rp.history), target_item=target,
                              target_prefix=int(item_prefix[target]), n_context=rp.n_context,
                              positives=positives, task_id=task_id,
                              lists={name: lists[r] for name, lists in ctx.lists.items()}))
    return out


class TrainingStage(Stage):
    name: ClassVar[str] = "training"
    # data: the catalogue's item texts, for a model with the text-match channel.
    requires: ClassVar[tuple[str, ...]] = ("data", "baselines", "grounding", "tokenization",
                                           "tasks")
    config_sections: ClassVar[tuple[str, ...]] = ("backbone", "model", "training")

    def run(self, ctx: StageContext) -> dict[str, Any]:
        cfg = ctx.config
        vocab, item_prefix = load_vocab(ctx.input("tokenization"))
        feats = load_item_features(ctx.input("grounding"), ctx.input("baselines"),
                                   cfg.tokenization.embedding)
        model, facts = build_sigma_model(cfg.backbone, cfg.model, vocab, feats, item_prefix)
        if cfg.model.prefix_init == "item_text":
            model.init_prefix_rows(prefix_text_states(ctx, vocab, model.hidden))
        else:
            model.init_prefix_rows_from(cfg.model.prefix_init, cfg.seed)
        train_df = pd.read_parquet(ctx.input("tasks") / "train.parquet")
        valid_df = pd.read_parquet(ctx.input("tasks") / "valid.parquet")
        if train_df.empty:
            raise StageError(f"{ctx.input('tasks')}/train.parquet holds no SFT samples")
        data = ProcessedData.load(ctx.input("data"))
        for ch in active_channels(cfg.model):
            ch.prepare(model, data.train_item_counts)
        matcher = data_matcher(cfg.model, data, cfg.tasks)
        style = load_prompt_style(ctx.input("tasks"))
        train_ex = to_examples(train_df, model, vocab, item_prefix, matcher=matcher, style=style)
        rng = np.random.default_rng(cfg.seed)
        # Stratified by task: every task gets the same share of the validation subset, so the
        # per-task quick HR is not left to a handful of instances.
        n_valid = min(len(valid_df), cfg.training.max_valid_examples or 256)
        groups = valid_df.groupby("task").indices
        per = max(1, n_valid // max(len(groups), 1))
        keep = np.concatenate([rng.choice(ix, min(per, len(ix)), replace=False)
                               for _, ix in sorted(groups.items())]) if groups else np.zeros(0)
        vsub = valid_df.iloc[np.sort(keep.astype(np.int64))]
        valid_ex = to_examples(vsub, model, vocab, item_prefix, with_target=False,
                               matcher=matcher, style=style)
        valid_targets = [np.asarray(t) for t in vsub["targets"]]
        lengths = [len(e.input_ids) for e in train_ex]
        log.info("training: %d SFT samples (prompt tokens median %d, max %d), %d validation",
                 len(train_ex), int(np.median(lengths)), max(lengths), len(valid_ex))

        codes0 = level0_codes(item_prefix, vocab.codebook_sizes)
        prior = prefix_prior(train_df["target"].to_numpy(np.int64), codes0,
                             int(vocab.codebook_sizes[0]))
        refs = reference_ntp([e.item_ids for e in valid_ex], valid_targets, codes0, prior)
        log.info("training: validation prefix NTP references: prior %.3f, prompt history + "
                 "prior %.3f (uniform %.3f)", refs["ref_ntp_prior"], refs["ref_ntp_history"],
                 float(np.log(vocab.codebook_sizes[0])))
        valid_tasks = vsub["task"].tolist()
        t_start = time.perf_counter()

        def validate(m: SigmaModel, step: int) -> dict[str, float]:
            out = decode_diagnostics(m, valid_ex, valid_targets, valid_tasks)
            return {**out, **refs, "wall_s": round(time.perf_counter() - t_start, 1)}

        result = train_sigma(model, train_ex, cfg.training, seed=cfg.seed,
                             checkpoint_dir=ctx.scratch, valid_examples=valid_ex,
                             validate_fn=validate, output_dir=ctx.out / "model")
        write_json(ctx.out / "learning_curve.json", {"references": refs,
                                                      "validations": result.validations,
                                                      "history": result.history})
        return {"backbone": facts, "train_samples": len(train_ex), "references": refs,
                "prompt_tokens_median": int(np.median(lengths)), **result.summary()}
