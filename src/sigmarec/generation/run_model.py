"""A trained run's SIGMA model and three-step decoder, assembled once for every reader.

The generation stage, the generation bench, the serving runtime and cold start all need the same
things from a run directory: the vocabulary and prefixes (tokenization), the frozen item features
(grounding, baselines), the trained checkpoint (training) and a decoder over it.
:func:`load_run_model` reads them with the run's OWN config (the training manifest's: the
backbone, tokenizer, model and tasks settings the checkpoint and its prompts were made with)
and the prompt style its tasks stage chose, whatever config the caller was started with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sigmarec.config import SigmaConfig
from sigmarec.core.stage import read_manifest
from sigmarec.errors import StageError
from sigmarec.generation.decode import SigmaDecoder
from sigmarec.grounding.artifacts import load_item_features
from sigmarec.model.sigma import SigmaModel, load_sigma_model
from sigmarec.tasks.prompt_style import PromptStyle, load_prompt_style
from sigmarec.tokenization.artifacts import load_vocab
from sigmarec.tokenization.hybrid import HybridVocab

MODEL_DIR = ("training", "model")


def model_dir(run_dir: Path) -> Path:
    """Where the run's trained SIGMA checkpoint lives."""
    return Path(run_dir).joinpath(*MODEL_DIR)


def run_config(run_dir: Path) -> SigmaConfig:
    """The config the run was trained with (from the training manifest): the encoder,
    tokenizer, model and task settings must be the run's, whatever the command line says."""
    run_dir = Path(run_dir)
    m = read_manifest(run_dir / "training")
    if m is None or not model_dir(run_dir).is_dir():
        raise StageError(f"{run_dir}: no trained model (training/); run `sigma run` with the same "
                         "--profile/--out first")
    return SigmaConfig.model_validate(m["config"])


@dataclass
class RunInputs:
    """What the run's checkpoint is loaded over: its config, vocabulary and trained items."""

    config: SigmaConfig  # the run's own (training manifest)
    vocab: HybridVocab
    item_prefix: np.ndarray  # (n trained items,) flat prefix ids
    item_features: dict[str, np.ndarray]  # the trained items' frozen features
    prompt: PromptStyle  # how its prompts read (its tasks stage's prompt.json)


def read_run_inputs(run_dir: Path) -> RunInputs:
    """The run's config (:func:`run_config`), vocabulary, prefixes, item features and prompt
    style."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    vocab, item_prefix = load_vocab(run_dir / "tokenization")
    feats = load_item_features(run_dir / "grounding", run_dir / "baselines",
                               cfg.tokenization.embedding)
    return RunInputs(config=cfg, vocab=vocab, item_prefix=item_prefix, item_features=feats,
                     prompt=load_prompt_style(run_dir / "tasks"))


@dataclass
class RunModel(RunInputs):
    """A run's trained model and a decoder over it, with what they were built from."""

    model: SigmaModel
    decoder: SigmaDecoder


def load_run_model(run_dir: Path, k_prefixes: int, m_per_prefix: int,
                   inputs: RunInputs | None = None,
                   extend: Callable[[SigmaModel], object] | None = None) -> RunModel:
    """The run's model (checked against its trained catalogue) and a decoder at ``k_prefixes``
    / ``m_per_prefix`` over it. ``inputs``: :func:`read_run_inputs`'s, when the caller read
    them already; ``extend`` may add items to the model (in place) before the decoder's prefix
    index is built, so they are indexed like the trained ones."""
    run_dir = Path(run_dir)
    inp = inputs if inputs is not None else read_run_inputs(run_dir)
    model = load_sigma_model(model_dir(run_dir), inp.config.backbone, inp.item_features,
                             inp.item_prefix)
    if extend is not None:
        extend(model)
    decoder = SigmaDecoder(model, k_prefixes, m_per_prefix,
                           index_backend=inp.config.tokenization.index.backend)
    return RunModel(**vars(inp), model=model, decoder=decoder)
