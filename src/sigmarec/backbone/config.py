"""Which LLM backbone a run uses, and how it is cut down for CPU runs.

Kept out of the root config module so the backbone can be developed and tested on its own; the
root ``SigmaConfig`` embeds it as ``backbone:``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class BackboneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    source: Literal["smollm2", "gemma3", "local", "tiny"] = Field(
        "smollm2",
        description="smollm2 / gemma3: packaged GGUF models (converted once to safetensors); "
        "local: a Hugging Face causal-LM folder; tiny: a random Llama for tests",
    )
    path: Path | None = Field(None, description="the model folder when source = local")
    num_layers: int | None = Field(
        None, ge=1, description="keep only the first N transformer layers; None = all"
    )
    dtype: Literal["float32", "bfloat16"] = "float32"
    # None is resolved at load time (not here) so the config hash does not depend on the machine.
    cache_dir: Path | None = Field(
        None, description="where converted models live; None = $SIGMAREC_CACHE or ~/.cache/sigmarec"
    )
    tiny_hidden: int = Field(64, ge=8)
    tiny_layers: int = Field(2, ge=1)
    tiny_heads: int = Field(4, ge=1)
    tiny_vocab: Literal["auto", "smollm2", "bytes"] = Field(
        "auto",
        description="tokenizer of the tiny model: the packaged SmolLM2 tokenizer (auto = when "
        "installed) or a byte-level one built offline",
    )
    tiny_seed: int = Field(0, description="seed of the tiny model's random initialisation")

    @model_validator(mode="after")
    def _check(self) -> BackboneConfig:
        if self.source == "local" and self.path is None:
            raise ValueError("backbone.path is required when backbone.source is 'local'")
        if self.tiny_hidden % self.tiny_heads:
            raise ValueError(
                f"backbone.tiny_hidden ({self.tiny_hidden}) must be divisible by "
                f"backbone.tiny_heads ({self.tiny_heads})"
            )
        if (self.source == "tiny" and self.num_layers is not None
                and self.num_layers > self.tiny_layers):
            raise ValueError(
                f"backbone.num_layers ({self.num_layers}) exceeds backbone.tiny_layers "
                f"({self.tiny_layers})"
            )
        return self

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir is not None:
            return Path(self.cache_dir).expanduser()
        env = os.environ.get("SIGMAREC_CACHE")
        return Path(env).expanduser() if env else Path.home() / ".cache" / "sigmarec"
