"""The one typed config that drives every stage.

Layers, later ones win: the defaults below, a named profile (``profiles/<name>.yaml``), any number
of user YAML files, then ``--set a.b=value`` overrides. Unknown keys are errors, so a typo in a
YAML file never silently falls back to a default.
"""

from __future__ import annotations

import hashlib
import json
from datetime import date
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sigmarec.backbone.config import BackboneConfig
from sigmarec.errors import ConfigError
from sigmarec.generation.config import GenerationConfig
from sigmarec.gr.config import GRConfig
from sigmarec.model.config import ModelConfig
from sigmarec.ranker.config import RankerConfig
from sigmarec.serving.config import ServingConfig
from sigmarec.tasks.config import TasksConfig
from sigmarec.tokenization.config import TokenizationConfig
from sigmarec.training.config import TrainingConfig

PROFILE_DIR = Path(__file__).parent / "profiles"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ColumnMap(_Strict):
    """Maps the columns of a user's file onto the common schema."""

    user: str = "user_id"
    item: str = "item_id"
    timestamp: str = "timestamp"
    basket: str | None = None
    quantity: str | None = None
    event: str | None = None


class ItemColumnMap(_Strict):
    item: str = "item_id"
    title: str | None = "title"
    category_path: list[str] = Field(default_factory=list)
    brand: str | None = None
    attributes: list[str] = Field(default_factory=list)
    image_embedding: str | None = None


class FilesSource(_Strict):
    """The user's own catalogue and logs (CSV, Parquet or JSONL, chosen by file suffix)."""

    interactions: Path | None = None
    items: Path | None = None
    users: Path | None = None
    interaction_columns: ColumnMap = Field(default_factory=ColumnMap)
    item_columns: ItemColumnMap = Field(default_factory=ItemColumnMap)
    user_id_column: str = "user_id"
    user_profile_columns: list[str] = Field(default_factory=list)
    timestamp_unit: Literal["s", "ms", "us", "ns", "iso"] = "iso"


class AmazonSource(_Strict):
    """Public Amazon-reviews files: 5-core reviews plus metadata (2014, 2018, 2023 formats)."""

    reviews: Path | None = None
    meta: Path | None = None


class AtomicItemFields(_Strict):
    """Field names (header names without their ``:type``) of a RecBole atomic ``.item`` file."""

    item: str = "item_id"
    title: str | None = "title"
    categories: str | None = Field("categories", description="a token_seq of category levels, "
                                   "top first, or a token holding one category")
    brand: str | None = "brand"
    price: str | None = "price"
    attributes: list[str] = Field(default_factory=list, description="further fields kept as "
                                  "item attributes (JSON), e.g. ['sales_type']")


class ExpectedCounts(_Strict):
    """Published statistics of a dataset, compared with what was read (a mismatch warns)."""

    users: int | None = Field(None, ge=1)
    items: int | None = Field(None, ge=1)
    interactions: int | None = Field(None, ge=1)


class SequencesSource(_Strict):
    """One user a line (``USER_ID ITEM ITEM ...``, time order) plus a RecBole atomic item file.

    Relative paths resolve against the current working directory (the repository root when run
    from there); ``sequences`` and ``items`` are taken inside ``root`` when it is set.
    """

    name: str = Field("sequences", min_length=1, description="dataset name in run info")
    root: Path | None = Field(None, description="folder holding the two files (None = the "
                              "paths below stand alone)")
    sequences: Path = Path("user_sequence.txt")
    items: Path | None = Field(None, description="RecBole atomic .item file; None = no "
                               "metadata (items titled by their id)")
    item_fields: AtomicItemFields = Field(default_factory=AtomicItemFields)
    expected: ExpectedCounts = Field(default_factory=ExpectedCounts)

    def path(self, p: Path) -> Path:
        return self.root / p if self.root is not None else p


class SplitConfig(_Strict):
    kind: Literal["temporal", "leave_one_out"] = "temporal"
    # Temporal: either explicit cut-off dates or window lengths counted back from the last event.
    valid_start: date | None = None
    test_start: date | None = None
    valid_days: int = Field(28, ge=1)
    test_days: int = Field(28, ge=1)
    # Which baskets of a user in an evaluation window become evaluation instances.
    instances: Literal["first_basket", "all_baskets"] = "first_basket"

    @model_validator(mode="after")
    def _dates_ordered(self) -> SplitConfig:
        if self.valid_start and self.test_start and self.valid_start >= self.test_start:
            raise ValueError(
                f"split.valid_start ({self.valid_start}) must be before "
                f"split.test_start ({self.test_start})"
            )
        return self


class DataConfig(_Strict):
    source: Literal["completejourney", "ml100k", "files", "amazon", "sequences"] = (
        "completejourney")
    files: FilesSource = Field(default_factory=FilesSource)
    amazon: AmazonSource = Field(default_factory=AmazonSource)
    # Left out of the config dump (and so of the stage hash) while at its defaults, so runs made
    # before this source existed stay fresh.
    sequences: SequencesSource = Field(
        default_factory=SequencesSource, exclude_if=lambda v: v == SequencesSource()
    )
    split: SplitConfig = Field(default_factory=SplitConfig)
    # Catalogue and user filters, counted on the training period only (no look-ahead).
    min_item_count: int = Field(1, ge=1)
    min_user_count: int = Field(1, ge=1)
    k_core: int = Field(0, ge=0, description="iterative k-core on training interactions; 0 = off")
    max_users: int | None = Field(None, ge=1, description="random subset of users (seeded)")
    # Complete Journey lists a basket's products in product_id order; a sequence model would
    # learn that sort. Shuffling within baskets with the run seed removes the artefact.
    shuffle_within_baskets: bool = True
    min_rating: float | None = Field(None, description="keep explicit ratings >= this (MovieLens)")
    # Cold-start evaluation: items first sold in the last N weeks are cut out of the catalogue and
    # of every interaction before anything is counted or fitted, and written apart (data/holdout/)
    # for `sigma items add` and `sigma bench coldstart`. Left out of the config dump (and so of
    # the stage hash) while off, so runs made before this option existed stay fresh.
    holdout_new_items_weeks: int | None = Field(
        None, ge=1, exclude_if=lambda v: v is None,
        description="hold out the items first sold in the last N weeks (cold-start evaluation)",
    )


class EvalConfig(_Strict):
    ks: list[int] = Field(default_factory=lambda: [1, 5, 10, 20])
    top_n: int = Field(50, ge=1, description="length of the ranked list each model writes")
    exclude_seen: bool = False
    max_instances: int | None = Field(None, ge=1)
    long_tail_head_share: float = Field(
        0.8, gt=0, lt=1, description="head = most popular items covering this share of training"
    )
    batch_size: int = Field(256, ge=1)
    category_level: int = Field(
        1, ge=0, description="category-path level (0 = top) used by the diversity metrics"
    )

    @field_validator("ks")
    @classmethod
    def _ks_valid(cls, v: list[int]) -> list[int]:
        if not v or any(k < 1 for k in v):
            raise ValueError(f"eval.ks must be positive integers, got {v}")
        return sorted(set(v))

    @model_validator(mode="after")
    def _top_n_covers_ks(self) -> EvalConfig:
        if self.top_n < max(self.ks):
            raise ValueError(f"eval.top_n ({self.top_n}) must be >= max(eval.ks) ({max(self.ks)})")
        return self


class SASRecConfig(_Strict):
    hidden: int = Field(64, ge=8)
    blocks: int = Field(2, ge=1)
    heads: int = Field(1, ge=1)
    dropout: float = Field(0.2, ge=0, lt=1)
    max_len: int = Field(50, ge=2)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_epochs: int = Field(30, ge=1)
    patience: int = Field(3, ge=1)
    max_steps_per_epoch: int | None = Field(None, ge=1)
    # Long histories are cut into windows of max_len so every purchase is a training target.
    window_stride: int | None = Field(None, ge=1, description="None = max_len (no overlap)")
    ce_target_fraction: float = Field(
        1.0, gt=0, le=1, description="CE loss only: the share of a batch's targets (drawn at "
        "random each step) that cost full-catalogue logits; the logits are nearly all of a CE "
        "step's time, and neighbouring targets of a window carry much the same gradient"
    )
    # BCE loss only: where the one negative per position comes from. "uniform": the whole
    # catalogue (the positive and the user's own items included); "unseen": redrawn until it is
    # no item of the training window, as the original SASRec samples outside the user's items.
    # These four options leave the config dump while at their defaults, so the stage hashes of
    # runs made before they existed (the default profile's) stay the same.
    negatives: Literal["uniform", "unseen"] = Field(
        "uniform", exclude_if=lambda v: v == "uniform")
    adam_beta2: float = Field(0.999, gt=0, lt=1, exclude_if=lambda v: v == 0.999,
                              description="the original SASRec uses 0.98")
    # Validation every epoch over every user is a large share of a short BCE epoch; a long
    # schedule can validate less often and/or on a fixed seeded subset of the users.
    valid_every: int = Field(1, ge=1, exclude_if=lambda v: v == 1, description="epochs "
                             "between validations; patience counts validations")
    valid_users: int | None = Field(
        None, ge=1, exclude_if=lambda v: v is None, description="validate on this many users "
        "drawn once with the seed (None = all); early stopping then picks the epoch on that subset")
    # Hyper-parameter grid searched on validation: {"lr": [...], "dropout": [...]}.
    tune: dict[str, list[Any]] = Field(default_factory=dict)
    device: str = "auto"

    @model_validator(mode="after")
    def _heads_divide(self) -> SASRecConfig:
        if self.hidden % self.heads:
            raise ValueError(f"sasrec.hidden ({self.hidden}) must be divisible by heads")
        return self


class CooccurrenceConfig(_Strict):
    window: int = Field(3, ge=1, description="neighbours counted in sequences without baskets")
    history: int = Field(20, ge=1, description="most recent history items that vote")
    decay: float = Field(0.9, gt=0, le=1)


BaselineName = Literal["mostpop", "repurchase", "cooccurrence", "sasrec_bce", "sasrec_ce"]


class BaselinesConfig(_Strict):
    enabled: list[BaselineName] = Field(
        default_factory=lambda: ["mostpop", "repurchase", "cooccurrence", "sasrec_bce", "sasrec_ce"]
    )
    sasrec: SASRecConfig = Field(default_factory=SASRecConfig)
    # Per-loss changes to ``sasrec`` (the two losses like different learning rates), e.g.
    # {"sasrec_bce": {"lr": 0.001, "max_epochs": 10}}.
    sasrec_overrides: dict[Literal["sasrec_bce", "sasrec_ce"], dict[str, Any]] = Field(
        default_factory=dict
    )

    @model_validator(mode="after")
    def _overrides_valid(self) -> BaselinesConfig:
        for name in self.sasrec_overrides:
            self.sasrec_for(name)  # raises on an unknown or invalid key, at load time
        return self

    def sasrec_for(self, name: str) -> SASRecConfig:
        over = self.sasrec_overrides.get(name, {})  # type: ignore[call-overload]
        return SASRecConfig.model_validate({**self.sasrec.model_dump(), **over})
    cooccurrence: CooccurrenceConfig = Field(default_factory=CooccurrenceConfig)
    repurchase_decay: float = Field(1.0, gt=0, le=1, description="per-step recency decay")
    # Which SASRec's item embeddings become the frozen ID tower for later stages.
    id_tower: Literal["sasrec_bce", "sasrec_ce"] = "sasrec_ce"


class ViewConfig(_Strict):
    weight: float = Field(1.0, ge=0, description="share of training pairs drawn from this view")
    budget: int = Field(20_000, ge=0, description="most pairs mined")
    # co_interaction only. Left out of the config dump while None (runs made before these
    # existed stay fresh). A sequence source has one item per basket, so window 1 (the same
    # basket) finds no pair there: neighbours in the sequence are the co-interactions.
    window: int | None = Field(
        None, ge=1, exclude_if=lambda v: v is None,
        description="co_interaction: a context is a basket and the next window - 1 baskets of "
        "the same user (None = 1, the same basket)",
    )
    min_count: int | None = Field(
        None, ge=1, exclude_if=lambda v: v is None,
        description="co_interaction: fewest contexts a pair must share (None = 3)",
    )


def _default_views() -> dict[str, ViewConfig]:
    return {
        "co_interaction": ViewConfig(weight=0.5, budget=50_000),
        "search": ViewConfig(weight=0.2, budget=20_000),
        "knowledge": ViewConfig(weight=0.2, budget=20_000),
        "visual": ViewConfig(weight=0.1, budget=20_000),
    }


class GroundingConfig(_Strict):
    """Multi-view semantic grounding: backbone text embeddings trained on relevance pairs."""

    text_template: str = Field(
        "{title} | {category_path} | {brand}",
        description="item text: items columns and attribute keys in braces",
    )
    dim: int = Field(128, ge=8, description="down-projected size of v_text")
    finetune: Literal["lora", "full", "frozen"] = "lora"
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    lora_targets: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    views: dict[str, ViewConfig] = Field(default_factory=_default_views)
    batch_size: int = Field(32, ge=2)
    steps: int = Field(200, ge=0)
    lr: float = Field(2e-4, gt=0, description="backbone (LoRA or full) learning rate")
    proj_lr: float = Field(1e-3, gt=0)
    tau: float = Field(0.05, gt=0, description="temperature of the text-similarity softmax")
    kd_tau: float = Field(0.1, gt=0, description="temperature of the ID-similarity softmax")
    kd_weight: float = Field(1.0, ge=0, description="weight of L_KD; 0 = contrastive only")
    max_text_tokens: int = Field(48, ge=4)
    encode_batch_size: int = Field(64, ge=1)
    checkpoint_every: int = Field(50, ge=1)
    benchmark_pairs: int = Field(5000, ge=10)
    benchmark_minilm: bool = Field(True, description="add all-MiniLM-L6-v2 to the benchmark")

    @field_validator("views")
    @classmethod
    def _known_views(cls, v: dict[str, ViewConfig]) -> dict[str, ViewConfig]:
        known = {"co_interaction", "search", "knowledge", "visual"}
        unknown = set(v) - known
        if unknown:
            raise ValueError(f"unknown grounding view(s) {sorted(unknown)}; known: {sorted(known)}")
        for name, vc in v.items():
            extra = [f for f in ("window", "min_count") if getattr(vc, f) is not None]
            if name != "co_interaction" and extra:
                raise ValueError(f"grounding.views.{name}: {extra} apply to co_interaction only")
        return v


class SigmaConfig(_Strict):
    """Root config."""

    name: str = "run"
    seed: int = 0
    profile: str = "default"
    threads: int | None = Field(None, ge=1, description="torch threads; None = all cores")
    data: DataConfig = Field(default_factory=DataConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    baselines: BaselinesConfig = Field(default_factory=BaselinesConfig)
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    grounding: GroundingConfig = Field(default_factory=GroundingConfig)
    tokenization: TokenizationConfig = Field(default_factory=TokenizationConfig)
    tasks: TasksConfig = Field(default_factory=TasksConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    gr: GRConfig = Field(default_factory=GRConfig)
    ranker: RankerConfig = Field(default_factory=RankerConfig)
    serving: ServingConfig = Field(default_factory=ServingConfig)

    def section_hash(self, *sections: str) -> str:
        """Stable hash of the named top-level sections (plus the seed) - a stage's config key."""
        payload = {s: self.model_dump(mode="json")[s] for s in sections}
        payload["seed"] = self.seed
        return _hash(payload)

    def full_hash(self) -> str:
        return _hash(self.model_dump(mode="json"))


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> dict[str, Any]:
    """``a.b.c=value`` -> nested dict; the value is parsed as YAML (numbers, lists, null...)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw else None
    out: dict[str, Any] = {}
    cur = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def load_config(
    profile: str = "default",
    files: list[Path] | None = None,
    overrides: list[str] | None = None,
) -> SigmaConfig:
    if profile not in available_profiles():
        raise ConfigError(f"unknown profile {profile!r}; choose one of {available_profiles()}")
    merged: dict[str, Any] = _read_yaml(PROFILE_DIR / f"{profile}.yaml")
    merged["profile"] = profile
    for f in files or []:
        merged = deep_merge(merged, _read_yaml(Path(f)))
    for o in overrides or []:
        merged = deep_merge(merged, parse_override(o))
    try:
        return SigmaConfig.model_validate(merged)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise ConfigError(
            f"invalid config at '{loc}': {first['msg']} (got {first.get('input')!r})"
        ) from None
