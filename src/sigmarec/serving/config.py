"""Typed settings of serving: the HTTP service, the nearline job and the U2I store.

The root config embeds :class:`ServingConfig` as the section ``serving``. No pipeline stage hashes
this section, so changing a serving setting never makes a trained run stale.
"""

from __future__ import annotations

from typing import Literal

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
    max_batch_requests: int = Field(64, ge=1, description="requests one /v1/recommend/batch "
                                    "call may hold")
    reload_every_s: float = Field(10.0, ge=0, description="how often the service looks for "
                                  "newly published events and added items (0 = never)")


class NearlineConfig(_Strict):
    tasks: list[str] = Field(default_factory=lambda: ["JustForYou"])
    k: int = Field(50, ge=1, description="items stored per user, task and version")
    batch_size: int = Field(16, ge=1)
    kv_cache: bool = Field(True, description="re-encode only the changed suffix of a prompt")
    kv_cache_max_mb: float = Field(2048.0, gt=0, description="disk the prompt KV entries "
                                   "(<run>/serving/kv/) may use; least recently used go first")
    model: str = Field("sigma", description="what the nearline lists come from: sigma or a "
                       "baseline of the run")
    keep_versions: int = Field(20, ge=1, description="published U2I versions a reader can "
                               "still pin; rows only older versions reach are pruned")


class NewItemsConfig(_Strict):
    """``sigma items add``: how an item that was never trained on gets its ID-tower input."""

    id_stand_in: Literal["text_neighbours", "prefix_mean", "ridge"] = Field(
        "text_neighbours", description="stand-in for the missing ID-tower vector: the mean ID "
        "vector of the nearest trained items in the text space (grounding distilled ID "
        "similarity into it), of the trained items sharing the new item's prefix, or a ridge "
        "map from text to ID vectors fitted on the trained catalogue")
    neighbours: int = Field(10, ge=1, description="text neighbours averaged (text_neighbours)")
    ridge_alpha: float = Field(1.0, gt=0, description="L2 penalty of the ridge map")


class ServingConfig(_Strict):
    service: ServiceConfig = Field(default_factory=ServiceConfig)
    nearline: NearlineConfig = Field(default_factory=NearlineConfig)
    items: NewItemsConfig = Field(default_factory=NewItemsConfig)
    u2i_store: str = Field("sqlite:u2i.sqlite",
                           description="backend:location; a relative SQLite path lives in the "
                           "run directory's serving/ folder")
