"""A finished run directory, loaded once, answering recommendation requests.

:meth:`Runtime.load` reads the data, the trained SIGMA model (as the generation stage does), its
three-step decoder at the K and tau the generation stage chose on validation, the baselines and
the task resources. Interactions that arrived after training (:func:`~sigmarec.serving.events.
load_events`) are appended to the users' histories and items added after training
(:func:`~sigmarec.serving.catalog.load_overlay`) join the catalogue, so both are visible after
``load`` / :meth:`Runtime.reload`.

A request goes through two steps:

* :meth:`Runtime.resolve` checks it and turns it into a :class:`Resolved` request (history as item
  indices, the profile line, the task and its parameters, the instruction text of the prompt, one
  allow mask for all filters). Every mistake is a :class:`RequestError` naming the field (the
  request types: :mod:`.request`).
* :meth:`Runtime.rank` ranks resolved requests: all SIGMA requests in one batched decoder call
  (prompts rendered exactly as the tasks stage renders evaluation instances, through
  ``training.stage.to_examples``; fused at the settings of :mod:`.fusion_choice`), each
  baseline over the same histories and masks.

:meth:`Runtime.recommend` is both. Filters never shorten a SIGMA list: the allow mask acts inside
the subset search, which widens the prefix beam when needed (``SigmaDecoder``), so ``k`` items
come back whenever ``k`` items pass the filters.

Items added after training (:mod:`sigmarec.serving.overlay`): the runtime calls
``apply_overlay(parts, overlay) -> RuntimeParts`` on the run's :class:`RuntimeParts` before it
builds the model, so the new rows of ``item_features`` / ``item_prefix`` / ``data.items`` get
soft tokens through the trained ProjFuse like every other item. Baselines cannot score items they
were not trained on: those rank after every trained item (and a strict filter drops them).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from sigmarec.baselines.base import Recommender
from sigmarec.baselines.registry import restore
from sigmarec.config import SigmaConfig
from sigmarec.data.processed import ProcessedData
from sigmarec.data.schema import CATEGORY_SEP
from sigmarec.errors import SigmaError, StageError
from sigmarec.generation.decode import SigmaDecoder
from sigmarec.generation.fusion import Candidates
from sigmarec.generation.run_model import load_run_model, model_dir, read_run_inputs
from sigmarec.metrics.ranking import top_n
from sigmarec.model.batch import SFTExample
from sigmarec.model.sigma import SigmaModel
from sigmarec.serving.catalog import catalog_dir, load_overlay
from sigmarec.serving.categories import (
    category_index,
    category_key,
    task_category,
    unknown_category,
)
from sigmarec.serving.events import events_dir, load_events
from sigmarec.serving.fusion_choice import FusionChoice, generation_choice
from sigmarec.serving.overlay import RuntimeParts, apply_overlay, extend_model
from sigmarec.serving.request import (
    SIGMA,
    RecItem,
    RecRequest,
    RequestError,
    Resolved,
)
from sigmarec.tasks.channels import Lister
from sigmarec.tasks.columns import history_listers, prompt_columns
from sigmarec.tasks.definitions import Cut, Task
from sigmarec.tasks.prompt_style import PromptStyle
from sigmarec.tasks.registry import build_tasks, get_task_class, match_instruction, supported
from sigmarec.tasks.resources import TaskResources, build_resources
from sigmarec.tasks.sft_data import item_description, prefix_tokens
from sigmarec.tasks.text import profile_text
from sigmarec.tasks.text_match import InstructionMatcher, text_matcher
from sigmarec.tokenization.hybrid import HybridVocab
from sigmarec.training.stage import to_examples

log = logging.getLogger("sigmarec")

# Tasks whose instruction needs a parameter that only a free-text instruction can give.
_NEEDS_INSTRUCTION = {"Query": "a search query", "Season": "a season", "Holiday": "a holiday"}


# Steps 1-2 of SIGMA for a batch: (decoder, examples, n, allow (B, n_items) or None) -> candidates.
CandidateFn = Callable[[SigmaDecoder, list[SFTExample], int, "np.ndarray | None"], Candidates]


@dataclass
class _State:
    parts: RuntimeParts
    overlay_version: str | None
    vocab: HybridVocab
    model: SigmaModel
    decoder: SigmaDecoder
    fusion: FusionChoice  # tau, K and copy scale chosen on validation
    resources: TaskResources
    tasks: dict[str, Task]
    baselines: dict[str, Recommender]
    extra: dict[int, np.ndarray]  # user_idx -> items of post-training events, in order
    user_index: dict[str, int]
    item_index: dict[str, int]
    item_ids: np.ndarray  # (n_items,) str
    categories: dict[str, np.ndarray]  # normalised category key -> item indices
    profile_columns: list[str]
    run_cfg: SigmaConfig  # the run's own config (its training manifest's)
    prompt: PromptStyle  # how the run's prompts read (its tasks stage's)
    matcher: InstructionMatcher | None = None  # the text-match channel's, over this catalogue
    # The copy prior's history channels' listers by name (sigmarec.tasks.channels).
    listers: dict[str, Lister | None] = dataclasses.field(default_factory=dict)


def _published(run_dir: Path) -> tuple[str, tuple[str, ...]]:
    current = catalog_dir(run_dir) / "CURRENT"
    version = current.read_text().strip() if current.is_file() else ""
    return version, tuple(sorted(f.name for f in events_dir(run_dir).glob("[0-9]*.parquet")))


class Runtime:
    """A run directory loaded once; see the module docstring. Thread-safe for readers:
    :meth:`reload` swaps the whole state at once."""

    def __init__(self, run_dir: Path, cfg: SigmaConfig, state: _State) -> None:
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self._state = state
        self._reload_lock = threading.Lock()
        self._stamp = _published(run_dir)

    # ------------------------------------------------------------------------------ loading
    @classmethod
    def load(cls, run_dir: Path, cfg: SigmaConfig) -> Runtime:
        run_dir = Path(run_dir)
        stamp = _published(run_dir)  # before reading, so a later publication is not missed
        rt = cls(run_dir, cfg, cls._build(run_dir, cfg))
        rt._stamp = stamp
        return rt

    @staticmethod
    def _build(run_dir: Path, cfg: SigmaConfig, previous: _State | None = None) -> _State:
        t0 = time.perf_counter()
        if not (run_dir / "data" / "info.json").is_file() or not model_dir(run_dir).is_dir():
            raise StageError(f"{run_dir}: not a trained run directory (needs data/ and "
                             f"training/model/); run `sigma run` with the same --profile/--out")
        overlay = load_overlay(run_dir)
        version = overlay.version if overlay is not None else None
        if previous is not None and previous.overlay_version == version:
            # Only events changed: the model, index and baselines stay.
            st = dataclasses.replace(previous)
            st.extra = Runtime._events(run_dir, st.parts.data.n_items)
            return st
        data = ProcessedData.load(run_dir / "data")
        inputs = read_run_inputs(run_dir)
        run_cfg = inputs.config  # prompts and tasks as the run built them, not as cfg says
        parts = apply_overlay(RuntimeParts(data=data, item_features=inputs.item_features,
                                           item_prefix=inputs.item_prefix,
                                           n_trained_items=data.n_items), overlay)
        data, n = parts.data, parts.n_trained_items

        def add_items(model: SigmaModel) -> None:
            # The checkpoint is checked against the trained catalogue, then extended.
            extend_model(model, {s: f[n:] for s, f in parts.item_features.items()},
                         parts.item_prefix[n:])

        choice = generation_choice(run_dir, cfg)
        tau, k_used = choice.tau, choice.k_prefixes
        run = load_run_model(run_dir, k_used, cfg.generation.m_per_prefix, inputs,
                             add_items if data.n_items > n else None)
        model, decoder, vocab = run.model, run.decoder, run.vocab
        res = build_resources(data, run_cfg.tasks)
        tasks, _ = supported(build_tasks(res, list(run_cfg.tasks.enabled)))
        baselines = {}
        for name in cfg.baselines.enabled:
            folder = run_dir / "baselines" / "models" / name
            if folder.is_dir():
                baselines[name] = restore(name, cfg, folder, data)
        items = data.items
        st = _State(
            parts=parts, overlay_version=version, vocab=vocab, model=model, decoder=decoder,
            fusion=choice, resources=res,
            tasks=tasks, baselines=baselines, matcher=text_matcher(model.cfg, items, res),
            listers=history_listers(res, run_cfg.tasks),
            run_cfg=run_cfg,
            prompt=inputs.prompt,
            extra=Runtime._events(run_dir, data.n_items),
            user_index={str(u): int(i) for u, i in zip(data.users["user_id"],
                                                        data.users["user_idx"], strict=True)},
            item_index={str(v): i for i, v in enumerate(items["item_id"])},
            item_ids=items["item_id"].astype(str).to_numpy(),
            categories=category_index(items),
            profile_columns=[c for c in data.users.columns if c not in ("user_idx", "user_id")],
        )
        log.info("serving: loaded %s in %.1fs (%d items, %d users, %d tasks, baselines %s, "
                 "K %d, tau %.3g, copy scale %g)", run_dir, time.perf_counter() - t0,
                 data.n_items, data.n_users, len(tasks), sorted(baselines), k_used, tau,
                 choice.copy_scale)
        return st

    @staticmethod
    def _events(run_dir: Path, n_items: int) -> dict[int, np.ndarray]:
        ev = load_events(run_dir)
        unknown = ev["item_idx"].to_numpy() >= n_items
        if unknown.any():
            log.warning("serving: %d post-training events name items outside the catalogue "
                        "(added items not loaded); they are left out", int(unknown.sum()))
            ev = ev[~unknown]
        # Publication order within a basket; baskets increase within a user.
        ev = ev.sort_values(["user_idx", "basket"], kind="stable")
        return {int(u): g["item_idx"].to_numpy(np.int64)
                for u, g in ev.groupby("user_idx", sort=False)}

    def stamp(self) -> tuple[str, tuple[str, ...]]:
        """What is published on disk now: the catalogue version and the event batch files."""
        return _published(self.run_dir)

    def reload(self) -> bool:
        """Pick up events and added items published since the last load; False when nothing
        changed."""
        with self._reload_lock:
            stamp = self.stamp()
            if stamp == self._stamp:
                return False
            self._state = self._build(self.run_dir, self.cfg, self._state)
            self._stamp = stamp
            return True

    # ---------------------------------------------------------------------------- accessors
    @property
    def data(self) -> ProcessedData:
        return self._state.parts.data

    @property
    def n_items(self) -> int:
        return self._state.parts.data.n_items

    @property
    def run_config(self) -> SigmaConfig:
        """The run's own config (its training manifest's): the tasks, tokenizer and model
        settings the prompts are built with; ``cfg`` (the command line's) sets serving only."""
        return self._state.run_cfg

    @property
    def model_names(self) -> list[str]:
        return [SIGMA, *self._state.baselines]

    @property
    def task_names(self) -> list[str]:
        return list(self._state.tasks)

    @property
    def tau(self) -> float:
        return self._state.fusion.tau

    @property
    def copy_scale(self) -> float:
        return self._state.fusion.copy_scale

    @property
    def fusion(self) -> FusionChoice:
        """Step 3's settings (mode, tau, K, copy scale, per task) chosen on validation."""
        return self._state.fusion

    def fuse(self, cands: Candidates, filtered: np.ndarray, n: int,
             tasks: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """SIGMA's step 3 for a decoded batch, at the settings chosen on validation (per
        task, given each row's ``tasks``)."""
        return self._state.fusion.fuse(cands, filtered, n, tasks)

    @property
    def k_prefixes(self) -> int:
        return self._state.fusion.k_prefixes

    @property
    def decoder(self) -> SigmaDecoder:
        """SIGMA's decoder (``.model``: the loaded model) of the state loaded now; a
        :meth:`reload` that adds items replaces it, so do not keep it across reloads."""
        return self._state.decoder

    @property
    def user_index(self) -> Mapping[str, int]:
        """Raw user id -> user index."""
        return self._state.user_index

    @property
    def item_index(self) -> Mapping[str, int]:
        """Raw item id -> item index (trained and added items)."""
        return self._state.item_index

    @property
    def item_ids(self) -> np.ndarray:
        """(n_items,) the raw item id of every item index."""
        return self._state.item_ids

    def profile_of(self, user_idx: int) -> str:
        """The profile line a known user's prompts show."""
        return self._state.resources.profiles[int(user_idx)]

    def user_idx(self, user_id: str) -> int:
        idx = self._state.user_index.get(str(user_id))
        if idx is None:
            raise RequestError("user_id", f"unknown user {user_id!r}")
        return idx

    def item_idx(self, item_id: str, field: str = "item_id") -> int:
        idx = self._state.item_index.get(str(item_id))
        if idx is None:
            raise RequestError(field, f"unknown item {item_id!r}")
        return idx

    def user_history(self, user_idx: int) -> np.ndarray:
        """Every item the user bought, oldest first: the data (all splits), then later events."""
        seq = self.data.sequence(int(user_idx))
        extra = self._state.extra.get(int(user_idx))
        return seq if extra is None else np.concatenate([seq, extra])

    def item_info(self, idx: int) -> dict[str, Any]:
        """The item's catalogue row (JSON-ready) with its prefix token(s)."""
        st = self._state
        row = st.parts.data.items.iloc[int(idx)]
        out = {k: (None if pd.isna(v) else v.item() if hasattr(v, "item") else v)
               for k, v in row.items() if not isinstance(v, (list, np.ndarray))}
        out["item_id"] = str(st.item_ids[int(idx)])
        out["prefix"] = prefix_tokens(int(idx), st.vocab, st.parts.item_prefix)
        out["added_after_training"] = int(idx) >= st.parts.n_trained_items
        return out

    def describe(self, idx: int) -> str:
        return item_description(self.data.items, int(idx))

    # ---------------------------------------------------------------------------- resolving
    def resolve(self, req: RecRequest) -> Resolved:
        """Check ``req`` and express it in the model's terms (raises :class:`RequestError`)."""
        st = self._state
        scfg = self.cfg.serving.service
        if req.model != SIGMA and req.model not in st.baselines:
            raise RequestError("model", f"unknown model {req.model!r}; this run serves "
                               f"{', '.join(self.model_names)}")
        if req.k <= 0 or req.k > self.n_items:
            raise RequestError("k", f"k must lie in 1..{self.n_items} (the catalogue size), "
                               f"got {req.k}")
        user, history, profile = self._who(req)
        task, params, instruction = self._what(req, scfg.max_instruction_chars)
        allow = self._filters(req, history)
        return Resolved(user_idx=user, history=history, profile=profile, task=task,
                        params=params, instruction=instruction, k=int(req.k), model=req.model,
                        allow=allow)

    def _who(self, req: RecRequest) -> tuple[int, np.ndarray, str]:
        st = self._state
        if req.user_id is not None:
            if req.history is not None:
                raise RequestError("history", "give either user_id or an explicit history, "
                                   "not both")
            if req.profile is not None:
                raise RequestError("profile", "a known user's profile comes from the data; "
                                   "give a profile only with an explicit history")
            u = self.user_idx(req.user_id)
            return u, self.user_history(u), self.profile_of(u)
        if req.history is None:
            raise RequestError("user_id", "give a user_id or an explicit history")
        limit = self.cfg.serving.service.max_history
        if not req.history:
            raise RequestError("history", "the history is empty; give at least one item id")
        if len(req.history) > limit:
            raise RequestError("history", f"{len(req.history)} items, more than the limit of "
                               f"{limit} (serving.service.max_history)")
        seen: dict[str, int] = {}
        hist = np.empty(len(req.history), dtype=np.int64)
        for i, item in enumerate(req.history):
            if item in seen:
                raise RequestError(f"history[{i}]", f"item {item!r} is already at position "
                                   f"{seen[item]}")
            seen[item] = i
            hist[i] = self.item_idx(item, f"history[{i}]")
        profile = {}
        for key, value in (req.profile or {}).items():
            if key not in st.profile_columns:
                raise RequestError(f"profile.{key}", f"unknown profile field; known: "
                                   f"{', '.join(st.profile_columns) or 'none'}")
            profile[key] = value
        return -1, hist, profile_text(profile, st.profile_columns)

    def _what(self, req: RecRequest, max_chars: int) -> tuple[str, dict[str, Any], str]:
        st = self._state
        task_name = None
        if req.task is not None:
            try:
                task_name = get_task_class(req.task).name
            except SigmaError:
                task_name = None
            if task_name not in st.tasks:
                raise RequestError("task", f"unknown task {req.task!r}; this run serves "
                                   f"{', '.join(st.tasks)}")
        if req.instruction is not None:
            text = req.instruction.strip()
            if not text:
                raise RequestError("instruction", "the instruction is empty")
            if len(text) > max_chars:
                raise RequestError("instruction", f"{len(text)} characters, more than the "
                                   f"limit of {max_chars} (serving.service.max_instruction_chars)")
            matched, params = match_instruction(text, st.resources)
            if task_name is not None and matched != task_name:
                if task_name in _NEEDS_INSTRUCTION or task_name == "Category":
                    raise RequestError("instruction", f"reads as task {matched} {params}, not "
                                       f"{task_name}; name the {task_name.lower()} in it")
                matched, params = task_name, {}
            if matched not in st.tasks:  # a task this dataset cannot define
                matched, params = "JustForYou", {"text": text}
            return matched, params, text
        task_name = task_name or "JustForYou"
        params: dict[str, Any] = {}
        if task_name in _NEEDS_INSTRUCTION:
            raise RequestError("instruction", f"task {task_name} needs "
                               f"{_NEEDS_INSTRUCTION[task_name]}: give an instruction that "
                               f"names it")
        if task_name == "Category":
            if req.category is None:
                raise RequestError("category", "task Category needs a category")
            lv = st.resources.category_level
            name = task_category(req.category, lv, st.resources.level_names[lv],
                                 st.categories, self.data.items)
            # A deeper category (or a path) is asked as its level's category, and the category
            # filter (_filters) keeps its own items only.
            params = {"category": name, "level": lv}
        elif task_name == "Discover":
            params = {"level": st.resources.discover_level}
        task = st.tasks[task_name]
        # The first held-out paraphrase: the wording the model is evaluated with, and stable.
        text = task.instruction(params, held_out=True, rng=np.random.default_rng(0))
        return task_name, params, text

    def _filters(self, req: RecRequest, history: np.ndarray) -> np.ndarray | None:
        st = self._state
        n = self.n_items
        if req.category is None and not req.exclude_bought and req.allow_items is None:
            return None
        allow = np.ones(n, dtype=bool)
        field = "exclude_bought"
        if req.category is not None:
            members = st.categories.get(category_key(req.category))
            if members is None:
                names = [k for k in st.categories if CATEGORY_SEP not in k]
                raise RequestError("category", unknown_category(req.category, names))
            only = np.zeros(n, dtype=bool)
            only[members] = True
            allow &= only
            field = "category"
        if req.exclude_bought:
            allow[history] = False
        if req.allow_items is not None:
            if not req.allow_items:
                raise RequestError("allow_items", "the allow list is empty")
            only = np.zeros(n, dtype=bool)
            for i, item in enumerate(req.allow_items):
                only[self.item_idx(item, f"allow_items[{i}]")] = True
            allow &= only
            field = "allow_items"
        if not allow.any():
            raise RequestError(field, "no item of the catalogue passes the filters")
        return allow

    # ------------------------------------------------------------------------------ ranking
    def _examples(self, resolved: Sequence[Resolved]) -> list[SFTExample]:
        st = self._state
        tc = st.run_cfg.tasks  # the prompts the model was trained on, whatever --set says
        cols = [prompt_columns(r.history, tc, st.listers) for r in resolved]
        rows = pd.DataFrame({
            **{k: [c[k] for c in cols] for k in (cols[0] if cols else {})},
            "profile": [r.profile for r in resolved],
            "instruction": [r.instruction for r in resolved],
            "task": [r.task for r in resolved],
            # to_examples reads a target even for prompt-only examples; nothing uses it.
            "targets": [np.zeros(1, dtype=np.int64)] * len(resolved),
        })
        return to_examples(rows, st.model, st.vocab, st.parts.item_prefix, with_target=False,
                           matcher=st.matcher, style=st.prompt)

    def prompt_examples(self, requests: Sequence[RecRequest]) -> list[SFTExample]:
        """The tokenised prompt of each request, as the generation stage builds them."""
        return self._examples([self.resolve(r) for r in requests])

    def recommend(self, requests: Sequence[RecRequest]) -> list[list[RecItem]]:
        """Ranked items per request (one batched decoder call for the SIGMA requests)."""
        return self.rank([self.resolve(r) for r in requests])

    def rank(self, resolved: Sequence[Resolved]) -> list[list[RecItem]]:
        """Ranked items per resolved request; SIGMA requests share one decoder call."""
        n = self.n_items
        # Items added by a reload between resolve and rank: a filter admits none of them.
        resolved = [r if r.allow is None or len(r.allow) == n else dataclasses.replace(
            r, allow=np.pad(r.allow, (0, n - len(r.allow)))) for r in resolved]
        out: list[list[RecItem]] = [[] for _ in resolved]
        by_model: dict[str, list[int]] = {}
        for i, r in enumerate(resolved):
            by_model.setdefault(r.model, []).append(i)
        for name, rows in by_model.items():
            part = [resolved[i] for i in rows]
            ranked = self._rank_sigma(part) if name == SIGMA else self._rank_baseline(name, part)
            for i, (items, scores) in zip(rows, ranked, strict=True):
                out[i] = self._items(items, scores)
        return out

    def _items(self, items: np.ndarray, scores: np.ndarray) -> list[RecItem]:
        st = self._state
        keep = (items >= 0) & np.isfinite(scores)
        return [RecItem(rank=r + 1, item_id=str(st.item_ids[i]), text=self.describe(i),
                        prefix=prefix_tokens(int(i), st.vocab, st.parts.item_prefix),
                        score=float(s))
                for r, (i, s) in enumerate(zip(items[keep], scores[keep], strict=True))]

    def _rank_sigma(self, resolved: Sequence[Resolved]) -> list[tuple[np.ndarray, np.ndarray]]:
        items, scores = self.sigma_lists(resolved)
        return [(items[b, :r.k], scores[b, :r.k]) for b, r in enumerate(resolved)]

    def sigma_lists(self, resolved: Sequence[Resolved],
                    candidates: CandidateFn | None = None) -> tuple[np.ndarray, np.ndarray]:
        """SIGMA's fused lists of resolved requests, (B, n) items and scores with n =
        max(eval.top_n, the largest k): their prompts, steps 1-2 and step 3 at the settings
        chosen on validation. ``candidates(decoder, examples, n, allow)`` replaces the decoder's
        own steps 1-2 (the nearline job continues from cached prompt KV); lists may end in
        padding (item -1, score -inf)."""
        st = self._state
        # Lists are decoded at least eval.top_n long, as the generation stage decodes them, so a
        # request's top k do not depend on which requests share its batch.
        n = max(self.cfg.eval.top_n, max(r.k for r in resolved))
        masks = [r.allow for r in resolved]
        allow = None
        if any(m is not None for m in masks):
            allow = np.stack([np.ones(self.n_items, dtype=bool) if m is None else m
                              for m in masks])
        examples = self._examples(resolved)
        with torch.no_grad():
            if candidates is None:
                cands = st.decoder.candidates(st.decoder.batch(examples), n, allow)
            else:
                cands = candidates(st.decoder, examples, n, allow)
        return self.fuse(cands, np.array([m is not None for m in masks]), n,
                         [r.task for r in resolved])

    def _rank_baseline(self, name: str, resolved: Sequence[Resolved]
                       ) -> list[tuple[np.ndarray, np.ndarray]]:
        model = self._state.baselines[name]
        users = np.array([r.user_idx for r in resolved], dtype=np.int64)
        with torch.no_grad():
            sc = model.score(users, [r.history for r in resolved]).float()
        if sc.shape[1] < self.n_items:
            # Items added after training: below every item the baseline can score.
            sc = torch.cat([sc, torch.full((sc.shape[0], self.n_items - sc.shape[1]),
                                           sc.min().item() - 1.0)], dim=1)
        for b, r in enumerate(resolved):
            if r.allow is not None:
                sc[b, torch.from_numpy(~r.allow)] = -torch.inf
        idx, val = top_n(sc, max(r.k for r in resolved))
        return [(idx[b, :r.k], val[b, :r.k]) for b, r in enumerate(resolved)]

    # ------------------------------------------------------------------------- for the tests
    def rule_mask(self, r: Resolved) -> np.ndarray:
        """(n_items,) the items the resolved task's checkable rule admits (all for JustForYou)."""
        task = self._state.tasks[r.task]
        cut = Cut(user_idx=r.user_idx, hist_len=len(r.history), timestamp=pd.Timestamp(0),
                  split="serve", history=r.history)
        return task.allowed(r.params, cut) if task.checkable else np.ones(self.n_items, bool)
