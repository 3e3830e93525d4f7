"""The two SASRec baselines as ``Recommender``s: ``sasrec_bce`` and ``sasrec_ce``.

Their item embeddings are the ID tower later stages reuse (``item_embeddings()``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from sigmarec.baselines.base import Recommender
from sigmarec.baselines.sasrec.model import SASRec, score_histories
from sigmarec.baselines.sasrec.train import fit_sasrec, resolve_device
from sigmarec.config import EvalConfig, SASRecConfig, SigmaConfig
from sigmarec.core.atomic import atomic_path, write_json
from sigmarec.data.processed import ProcessedData
from sigmarec.errors import StageError

STATE_FILE = "model.pt"
HPARAMS_FILE = "hparams.json"


class SASRecRecommender(Recommender):
    name: ClassVar[str] = "sasrec"
    loss: ClassVar[str]

    def __init__(
        self,
        cfg: SASRecConfig | None = None,
        seed: int = 0,
        eval_cfg: EvalConfig | None = None,
        progress: bool | None = None,
    ) -> None:
        self.cfg = cfg or SASRecConfig()
        self.seed = seed
        self.eval_cfg = eval_cfg or EvalConfig()
        self.progress = progress
        self.model: SASRec | None = None
        self.trained_cfg: SASRecConfig | None = None  # the winning grid point

    @classmethod
    def from_config(cls, config: SigmaConfig) -> SASRecRecommender:
        return cls(config.baselines.sasrec_for(cls.name), config.seed, config.eval)

    def fit(self, data: ProcessedData) -> dict[str, Any]:
        self.model, self.trained_cfg, summary = fit_sasrec(
            data, self.cfg, self.loss, self.seed, self.eval_cfg, self.progress, self.name
        )
        return summary

    def _require_model(self) -> SASRec:
        if self.model is None:
            raise StageError(f"{self.name}: used before fit() or load()")
        return self.model

    def score(self, users: np.ndarray, histories: list[np.ndarray]) -> torch.Tensor:
        return score_histories(self._require_model(), histories)

    def item_embeddings(self) -> np.ndarray:
        """(n_items, hidden) float32 item embeddings, row i = item_idx i (padding row dropped)."""
        w = self._require_model().item_weights().detach().float().cpu().numpy()
        return np.ascontiguousarray(w, dtype=np.float32)

    def hparams(self) -> dict[str, Any]:
        model = self._require_model()
        cfg = self.trained_cfg or self.cfg
        return {
            "name": self.name,
            "loss": self.loss,
            "n_items": model.n_items,
            "hidden": model.hidden,
            "blocks": len(model.blocks.layers),
            "heads": model.heads,
            "dropout": cfg.dropout,
            "max_len": model.max_len,
            "seed": self.seed,
            "trained_with": cfg.model_dump(mode="json"),
        }

    def save(self, folder: Path) -> None:
        model = self._require_model()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / STATE_FILE) as tmp:
            torch.save({k: v.cpu() for k, v in model.state_dict().items()}, tmp)
        write_json(folder / HPARAMS_FILE, self.hparams())

    @classmethod
    def load(cls, folder: Path, device: str = "cpu") -> SASRecRecommender:
        """Rebuild a saved model (e.g. to reuse the ID tower) without retraining."""
        folder = Path(folder)
        hp = json.loads((folder / HPARAMS_FILE).read_text())
        impl = REGISTRY_BY_LOSS.get(hp["loss"], cls)
        rec = impl(SASRecConfig.model_validate(hp["trained_with"]), hp["seed"])
        model = SASRec(hp["n_items"], hp["hidden"], hp["blocks"], hp["heads"], hp["dropout"],
                       hp["max_len"])
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        rec.model = model.to(resolve_device(device)).eval()
        rec.trained_cfg = rec.cfg
        return rec


class SASRecBCE(SASRecRecommender):
    name: ClassVar[str] = "sasrec_bce"
    loss: ClassVar[str] = "bce"


class SASRecCE(SASRecRecommender):
    name: ClassVar[str] = "sasrec_ce"
    loss: ClassVar[str] = "ce"


REGISTRY_BY_LOSS: dict[str, type[SASRecRecommender]] = {"bce": SASRecBCE, "ce": SASRecCE}
