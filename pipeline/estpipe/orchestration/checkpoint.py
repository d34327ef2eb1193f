"""Checkpoints (DESIGN.md, "Checkpoint"): JSON, never a pickle, written atomically after every
accepted iteration, so `--resume` can continue a killed run from its last accepted parameters.

A checkpoint holds the data fingerprint and the options that change the estimate (a checkpoint of
other data or options is refused), the step in progress, its weight matrix (for step 2 the
covariance S(b1) it inverts, and b1 itself), the last accepted parameters, the evaluation count,
the finished steps, the history of accepted iterations, and the run's scaling (the units the
optimizer works in, fixed at the start of the run, so a resumed run takes the same path).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from estpipe.errors import UserError, term
from estpipe.estimation.gmm import GmmState
from estpipe.estimation.mle import MleState
from estpipe.outputs import write_json_atomic

KIND = "estpipe-checkpoint"
VERSION = 2


@dataclass
class Checkpoint:
    """fingerprint: the data's; options: those that change the estimate; state: where the run is."""

    fingerprint: str
    options: dict
    state: GmmState | MleState

    @property
    def estimator(self) -> str:
        return getattr(self.state, "estimator", "gmm")

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def evaluations(self) -> int:
        return self.state.evaluations

    @property
    def history(self) -> list[dict]:
        return self.state.history

    def to_dict(self) -> dict:
        return {"kind": KIND, "version": VERSION, "estimator": self.estimator, "fingerprint": self.fingerprint,
                "options": self.options, **self.state.to_dict()}

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomic(path, self.to_dict())


def load_checkpoint(path: str | os.PathLike, fingerprint: str, options: dict, data_path: str) -> Checkpoint | None:
    """The checkpoint at `path`, or None when there is none yet (the run starts fresh).

    Refuses (UserError) a file that is not a checkpoint, or one of other data or options."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        d = json.loads(path.read_text())
        if d.get("kind") != KIND:
            raise ValueError
    except (ValueError, OSError, AttributeError):
        raise UserError(f"{path}: not an estpipe checkpoint; give another {term('checkpoint')} path or remove this file") from None
    if d.get("version") != VERSION:
        raise UserError(f"{path}: checkpoint version {d.get('version')!r}, this estpipe writes {VERSION}; remove it to start fresh")
    if d["fingerprint"] != fingerprint:
        raise UserError(
            f"{path}: this checkpoint belongs to other data (fingerprint {d['fingerprint']}, but {data_path} has "
            f"{fingerprint}); remove it or give another {term('checkpoint')} to start fresh"
        )
    if d["options"] != options:
        # the default estimator is left out of the options (older checkpoints have none): name it
        was, now = {"estimator": "gmm"} | d["options"], {"estimator": "gmm"} | options
        diff = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
        shown = ", ".join(f"{k} was {was.get(k)!r}, now {now.get(k)!r}" for k in diff)
        raise UserError(f"{path}: this checkpoint was written with other options ({shown}); "
                        "rerun with the same options, or remove it to start fresh")
    kind = MleState if d.get("estimator", "gmm") == "mle" else GmmState
    try:
        state = kind.from_dict(d)
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path}: a damaged estpipe checkpoint (its state cannot be read); remove it to start fresh") from None
    return Checkpoint(fingerprint=d["fingerprint"], options=d["options"], state=state)
