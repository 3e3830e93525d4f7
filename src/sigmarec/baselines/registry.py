"""Baseline name (as in ``baselines.enabled``) -> its ``Recommender`` class."""

from __future__ import annotations

from pathlib import Path

from sigmarec.baselines.base import Recommender
from sigmarec.baselines.cooccurrence import Cooccurrence
from sigmarec.baselines.popularity import MostPop
from sigmarec.baselines.repurchase import Repurchase
from sigmarec.baselines.sasrec import SASRecBCE, SASRecCE
from sigmarec.config import SigmaConfig
from sigmarec.data.processed import ProcessedData
from sigmarec.errors import ConfigError

REGISTRY: dict[str, type[Recommender]] = {
    cls.name: cls for cls in (MostPop, Repurchase, Cooccurrence, SASRecBCE, SASRecCE)
}
SASREC_NAMES = ("sasrec_bce", "sasrec_ce")


def create(name: str, config: SigmaConfig) -> Recommender:
    try:
        cls = REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown baseline {name!r}; choose from {sorted(REGISTRY)}") from None
    return cls.from_config(config)


def restore(name: str, config: SigmaConfig, folder: Path, data: ProcessedData) -> Recommender:
    """A fitted baseline again: SASRec from its saved weights (its training is not repeated
    and not re-randomised), the count-based models by refitting on the same training data
    (deterministic and seconds)."""
    cls = REGISTRY.get(name)
    if cls is None:
        raise ConfigError(f"unknown baseline {name!r}; choose from {sorted(REGISTRY)}")
    if name in SASREC_NAMES:
        from sigmarec.baselines.sasrec import SASRecRecommender

        if not (Path(folder) / "hparams.json").is_file():
            raise ConfigError(f"{folder}: no saved {name} model; rerun the baselines stage")
        return SASRecRecommender.load(folder, config.baselines.sasrec_for(name).device)
    model = create(name, config)
    model.fit(data)
    return model
