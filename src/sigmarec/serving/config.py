"""Typed settings of serving: the HTTP service, the nearline job and the U2I store.

The root config embeds :class:`ServingConfig` as the section ``serving``. No pipeline stage hashes
this section, so changing a serving setting never makes a trained run stale.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ServiceConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_batch_size: int = Field(16, ge=1, description="requests fused into one generation call")
    max_wait_ms: float = Field(5.0, ge=0, description="how long a request waits for batch-mates")
    max_body_bytes: int = Field(1_000_000, ge=1024)
    max_concurrency: int = Field(64, ge=1, description="requests in flight before 503")
    max_instruction_chars: int = Field(500, ge=1)
    max_history: int = Field(1000, ge=1, description="items an explicit history may hold")


class NearlineConfig(_Strict):
    tasks: list[str] = Field(default_factory=lambda: ["JustForYou"])
    k: int = Field(50, ge=1, description="items stored per user, task and version")
    batch_size: int = Field(16, ge=1)
    kv_cache: bool = Field(True, description="re-encode only the changed suffix of a prompt")


class ServingConfig(_Strict):
    service: ServiceConfig = Field(default_factory=ServiceConfig)
    nearline: NearlineConfig = Field(default_factory=NearlineConfig)
    u2i_store: str = Field("sqlite:u2i.sqlite",
                           description="backend:location; a relative SQLite path lives in the "
                           "run directory's serving/ folder")
