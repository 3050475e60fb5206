"""Per-unit state on disk, so a killed calibration resumes after its last finished unit."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from clcalib.atomic import atomic_path
from clcalib.graph.partition import QuantModel

STATE_NAME = "units.safetensors"


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors ``save_file``, atomically (the file is complete or absent)."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


class ResumeStore:
    def __init__(self, folder: str | Path, key: str):
        self.path = Path(folder) / STATE_NAME
        self.key = key

    def save(self, qm: QuantModel, done: int, reports: list[dict]) -> None:
        prefixes = tuple(f"model.{n}." for n in qm.unit_names[:done])
        state = {k: v for k, v in qm.state_dict().items() if k.startswith(prefixes)}
        atomic_save(state, self.path, {"key": self.key, "done": str(done), "reports": json.dumps(reports)})

    def load(self, qm: QuantModel) -> tuple[int, list[dict]]:
        """Restore finished units into ``qm``; (0, []) when there is nothing matching to resume."""
        if not self.path.is_file():
            return 0, []
        from safetensors import safe_open

        with safe_open(str(self.path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("key") != self.key:
            return 0, []  # state of other inputs or another config: start over
        done = int(meta["done"])
        state = load_file(str(self.path))
        qm.load_state_dict({**qm.state_dict(), **state})
        for unit in qm.units()[:done]:
            for q in unit.act_quantizers():
                q.initialized = True
        return done, json.loads(meta["reports"])
