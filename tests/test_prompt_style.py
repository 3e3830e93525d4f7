"""The run's prompt style: the default prompt is unchanged, a configured system prompt reaches
the tasks stage and the examples training and serving build, a dataset without user attributes
gets no profile line, and the config dump (stage hashes) stays as it was while unset."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError
from test_model import make_model
from test_tasks import _Cfg, data_config, planted_dataset, tasks_config, write_stage_inputs

from sigmarec.config import load_config
from sigmarec.core.stage import execute
from sigmarec.data.build import build
from sigmarec.errors import StageError
from sigmarec.tasks import TasksConfig, build_sft_data, decode_sample, render_prompt
from sigmarec.tasks.prompt_style import (
    DEFAULT_STYLE,
    PROMPT_FILE,
    SYSTEM_PROMPT,
    PromptStyle,
    load_prompt_style,
    prompt_style,
)
from sigmarec.tasks.stage import TasksStage
from sigmarec.tasks.text import UNKNOWN_PROFILE
from sigmarec.tokenization.hybrid import HybridVocab

VOCAB = {"prefix_codebook_sizes": [4, 4], "query_token": "<q>"}
PREFIX = np.arange(20) % 16
ROW = {"history": np.array([5, 2]), "frequent": np.array([7]),
       "profile": "age 25-34, income 50-74k", "instruction": "something for <q> breakfast",
       "target": 3}
BEAUTY = "You recommend beauty products. Read what the shopper bought recently and the request."

# The prompts as the renderer wrote them before the style existed (ChatML, no tokenizer).
GROCERY = ("<|im_start|>system\nYou are a recommender for a grocery retailer. Read the "
           "household's profile, what it bought recently and the request, then name the product "
           "to show.<|im_end|>\n<|im_start|>user\n")
EXPECTED_FULL = (GROCERY + "Household profile: age 25-34, income 50-74k.\n"
                 "Bought most often (most first): <a_1><b_3><|item|>\n"
                 "Recently bought (oldest first): <a_1><b_1><|item|> <a_0><b_2><|item|>\n"
                 "Request: something for   breakfast<|im_end|>\n<|im_start|>assistant\n")
EXPECTED_EMPTY = (GROCERY + "Household profile: unknown (no demographics on file).\n"
                  "Recently bought (oldest first): nothing yet\n"
                  "Request: surprise me<|im_end|>\n<|im_start|>assistant\n")


def test_the_default_style_renders_exactly_the_old_prompt() -> None:
    p = render_prompt(ROW, None, VOCAB, PREFIX)
    assert p.text == EXPECTED_FULL and render_prompt(ROW, None, VOCAB, PREFIX,
                                                     style=DEFAULT_STYLE).text == EXPECTED_FULL
    assert p.label == "<a_0><b_3><q>" and p.history == [7, 5, 2] and p.n_context == 1
    assert [EXPECTED_FULL[i:i + 8] for i in p.positions] == ["<|item|>"] * 3
    empty = {"history": np.array([], dtype=np.int64), "profile": UNKNOWN_PROFILE,
             "instruction": "surprise me"}
    assert render_prompt(empty, None, VOCAB, PREFIX).text == EXPECTED_EMPTY
    # The tasks stage's choice for a dataset with some profiles and no system_prompt.
    assert prompt_style(TasksConfig(), ["age 25-34", UNKNOWN_PROFILE]) == DEFAULT_STYLE


def test_a_style_sets_the_system_turn_and_can_drop_the_profile_line() -> None:
    style = PromptStyle(system=BEAUTY, profile_line=False)
    text = render_prompt(ROW, None, VOCAB, PREFIX, style=style).text
    assert text == EXPECTED_FULL.replace(SYSTEM_PROMPT, BEAUTY).replace(
        "Household profile: age 25-34, income 50-74k.\n", "")
    assert "Household profile" not in decode_sample(
        {**ROW, "history": np.array([1])}, pd.DataFrame({"title": [f"t{i}" for i in range(20)]}),
        VOCAB, PREFIX, style=style)
    assert prompt_style(TasksConfig(system_prompt=BEAUTY), [UNKNOWN_PROFILE] * 3) == style


def test_system_prompt_stays_out_of_the_config_dump_while_unset() -> None:
    cfg = load_config("tiny")
    assert "system_prompt" not in cfg.model_dump(mode="json")["tasks"]
    custom = load_config("tiny", overrides=[f"tasks.system_prompt={BEAUTY}"])
    assert custom.model_dump(mode="json")["tasks"]["system_prompt"] == BEAUTY
    assert custom.section_hash("tasks") != cfg.section_hash("tasks")
    with pytest.raises(ValidationError, match="blank"):
        TasksConfig(system_prompt="  ")


def test_load_prompt_style_defaults_for_older_runs_and_names_a_bad_file(tmp_path) -> None:
    with pytest.raises(StageError, match="no tasks stage output"):
        load_prompt_style(tmp_path / "tasks")
    (tmp_path / "tasks").mkdir()
    assert load_prompt_style(tmp_path / "tasks") == DEFAULT_STYLE  # made before prompt.json
    (tmp_path / "tasks" / PROMPT_FILE).write_text(json.dumps({"system": "", "profile_line": 1}))
    with pytest.raises(StageError, match=r"prompt.json: system: "):
        load_prompt_style(tmp_path / "tasks")


def _tasks_run(tmp_path, data, **tasks) -> tuple[PromptStyle, dict]:
    write_stage_inputs(tmp_path, data)
    cfg = _Cfg(tasks=tasks_config(total_samples=200, examples_per_task=1, **tasks))
    execute(TasksStage(), cfg, tmp_path)
    out = tmp_path / "tasks"
    return load_prompt_style(out), json.loads((out / "examples.json").read_text())


def test_the_tasks_stage_writes_the_configured_system_prompt(tmp_path) -> None:
    data = build(planted_dataset(n_users=20), data_config(), seed=0)
    style, examples = _tasks_run(tmp_path, data, system_prompt=BEAUTY)
    assert style == PromptStyle(system=BEAUTY, profile_line=True)  # some users have an age
    prompts = [e["prompt"] for task in examples.values() for s in task.values() for e in s]
    assert prompts and all(p.startswith(f"<|im_start|>system\n{BEAUTY}<|im_end|>")
                           and "Household profile: " in p for p in prompts)


def test_no_profile_line_on_a_dataset_without_user_attributes(tmp_path) -> None:
    ds = planted_dataset(n_users=20)
    ds.users = ds.users[["user_id"]]
    data = build(ds, data_config(), seed=0)
    style, examples = _tasks_run(tmp_path, data)
    assert style == PromptStyle(system=SYSTEM_PROMPT, profile_line=False)
    prompts = [e["prompt"] for task in examples.values() for s in task.values() for e in s]
    assert prompts and not any("Household profile" in p for p in prompts)
    sft = build_sft_data(data, tasks_config(total_samples=200), seed=0)
    assert set(sft.resources.profiles) == {UNKNOWN_PROFILE}


def test_to_examples_renders_the_style_it_is_given() -> None:
    from sigmarec.training.stage import to_examples

    model = make_model()
    rows = pd.DataFrame({"instruction": ["something nice"], "targets": [np.array([1])],
                         "history": [np.array([2, 3])], "profile": ["age 25-34"]})
    vocab, prefix = HybridVocab(model.codebook_sizes), model.item_prefix.numpy()
    style = PromptStyle(system=BEAUTY, profile_line=False)
    (ex,) = to_examples(rows, model, vocab, prefix, with_target=False, style=style)
    want = render_prompt(rows.iloc[0], None, vocab, prefix, model.tokenizer, style=style).text
    assert ex.input_ids == model.tokenizer(want, add_special_tokens=False)["input_ids"]
    text = model.tokenizer.decode(ex.input_ids)
    assert BEAUTY in text and SYSTEM_PROMPT not in text and "Household profile" not in text
    (old,) = to_examples(rows, model, vocab, prefix, with_target=False, style=DEFAULT_STYLE)
    assert "Household profile: age 25-34." in model.tokenizer.decode(old.input_ids)
