"""Checkpoint I/O shared by the SIGMA model and the GR baselines: what training changes (the
adapters, new-token rows and the model's own heads) in a safetensors file, beside a JSON of
what is needed to rebuild the model and to refuse weights that belong to another vocabulary,
catalogue or backbone."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch


class TrainableCheckpoint:
    """Save and load the trainable part of an ``nn.Module`` subclass. Subclasses name their
    files, the meta keys that must match (``identity_keys``) and what else they keep
    (:meth:`kept_state`), and may check more in :meth:`check_saved`."""

    weights_file: ClassVar[str]
    meta_file: ClassVar[str]
    identity_keys: ClassVar[tuple[str, ...]]
    identity_what: ClassVar[str] = "another vocabulary, catalogue or backbone"

    def trainable_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def kept_state(self, keys: set[str]) -> set[str]:
        """Non-trainable entries of ``keys`` (a state dict's) that are saved too."""
        return set()

    def required_state(self) -> set[str]:
        """The non-trainable entries a checkpoint must hold."""
        return set()

    def trainable_state(self, state: Mapping[str, torch.Tensor] | None = None
                        ) -> dict[str, torch.Tensor]:
        """What training changes, as CPU copies. ``state`` filters a full state dict instead
        (e.g. the gathered one of an FSDP model)."""
        full = self.state_dict() if state is None else state
        keep = set(self.trainable_names()) | self.kept_state(set(full))
        return {k: v.detach().to("cpu", copy=True).contiguous()
                for k, v in full.items() if k in keep}

    def load_trainable_state(self, state: Mapping[str, torch.Tensor]) -> None:
        own = self.state_dict()
        unknown = sorted(set(state) - set(own))
        if unknown:
            raise ValueError(f"weights for unknown parameters: {unknown[:3]}")
        missing = sorted((set(self.trainable_names()) | self.required_state()) - set(state))
        if missing:
            raise ValueError(f"weights missing for trainable parameters: {missing[:3]}")
        self.load_state_dict(dict(state), strict=False)

    def meta(self) -> dict[str, Any]:
        raise NotImplementedError

    def weights_device(self) -> torch.device:
        raise NotImplementedError

    def check_saved(self, folder: Path, meta: Mapping[str, Any],
                    state: Mapping[str, torch.Tensor]) -> None:
        """Refuse a checkpoint this model cannot read (beyond the identity keys)."""

    def save_trainable(self, folder: Path, state: Mapping[str, torch.Tensor] | None = None
                       ) -> None:
        """Write the trainable weights and what is needed to rebuild the model into ``folder``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.trainable_state(state), str(folder / self.weights_file))
        (folder / self.meta_file).write_text(json.dumps(self.meta(), indent=2) + "\n")

    def load_trainable(self, folder: Path) -> None:
        from safetensors.torch import load_file

        folder = Path(folder)
        meta = json.loads((folder / self.meta_file).read_text())
        own = self.meta()
        for key in self.identity_keys:
            if meta[key] != own[key]:
                raise ValueError(f"{folder}: saved {key} differs from this model's; the weights "
                                 f"belong to {self.identity_what}")
        state = load_file(str(folder / self.weights_file))
        self.check_saved(folder, meta, state)
        device = self.weights_device()
        self.load_trainable_state({k: v.to(device) for k, v in state.items()})
