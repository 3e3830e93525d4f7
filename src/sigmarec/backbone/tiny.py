"""A randomly initialised Llama (SmolLM2's architecture) for fast tests, with the real SmolLM2
tokenizer when the package is installed, else a byte-level one built offline."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sigmarec.backbone import packaged
from sigmarec.backbone.config import BackboneConfig
from sigmarec.backbone.hf import DTYPES, ensure_pad_token

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def load_tiny(
    cfg: BackboneConfig,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer, tok_name = _tiny_tokenizer(cfg)
    ensure_pad_token(tokenizer)
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
    model.to(DTYPES[cfg.dtype])
    return model, tokenizer, {"tokenizer": tok_name}


def _tiny_tokenizer(cfg: BackboneConfig) -> tuple[PreTrainedTokenizerBase, str]:
    mode = cfg.tiny_vocab
    if mode == "auto":
        have = all(importlib.util.find_spec(m) is not None
                   for m in (packaged.SMOLLM2_MODULE, "gguf"))
        mode = "smollm2" if have else "bytes"
    if mode == "bytes":
        return _byte_tokenizer(), "bytes"
    return _smollm2_tokenizer(cfg), "smollm2"


def _smollm2_tokenizer(cfg: BackboneConfig) -> PreTrainedTokenizerBase:
    """SmolLM2's tokenizer, from the converted model if present, else from a tokenizer cache.

    Reading only the tokenizer from the GGUF takes ~4 s (no tensors), saved ~0.3 s.
    """
    from transformers import AutoTokenizer

    converted = packaged.converted_dir(cfg, "smollm2")
    if packaged.cache_valid(converted):
        return AutoTokenizer.from_pretrained(converted, local_files_only=True)
    version = packaged.dist_version(packaged.SMOLLM2_DIST)
    folder = cfg.resolved_cache_dir() / "tokenizers" / f"smollm2-{version}"
    if not packaged.cache_valid(folder):
        gguf_path = packaged.smollm2_gguf()

        def build(tmp: Path) -> None:
            tok = AutoTokenizer.from_pretrained(
                gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True
            )
            tok.save_pretrained(tmp)

        packaged.build_atomically(folder, build, {"source": "smollm2 tokenizer",
                                                  "origin": str(gguf_path)})
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
