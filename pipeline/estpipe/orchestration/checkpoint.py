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
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from estpipe import interrupts
from estpipe.errors import UserError, term
from estpipe.outputs import file_mode

KIND = "estpipe-checkpoint"
VERSION = 2


def write_json_atomic(path: str | os.PathLike, payload: dict) -> None:
    """Write JSON to a temporary file in the same folder, flush it to disk, rename over `path`.

    The file gets the usual permissions (0666 less the umask). The temporary file is registered
    with estpipe.interrupts while it exists, so a signal removes it; `path` is always either the
    old file or the new one. OSError propagates (the callers decide what a failed write means)."""
    path = Path(path)
    with interrupts.deferred():
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
        cleanup = interrupts.register(interrupts.remove_file(tmp), tmp)
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1, allow_nan=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        interrupts.unregister(cleanup)


@dataclass
class Checkpoint:
    fingerprint: str
    options: dict
    step: int
    weight: dict | None
    b1: list[float] | None
    params: list[float]
    evaluations: int
    steps_done: list[dict] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    scaling: dict | None = None

    def to_dict(self) -> dict:
        return {"kind": KIND, "version": VERSION, "fingerprint": self.fingerprint, "options": self.options,
                "step": self.step, "weight": self.weight, "b1": self.b1, "params": self.params,
                "evaluations": self.evaluations, "steps_done": self.steps_done, "history": self.history,
                "scaling": self.scaling}

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
        diff = sorted(k for k in set(d["options"]) | set(options) if d["options"].get(k) != options.get(k))
        shown = ", ".join(f"{k} was {d['options'].get(k)!r}, now {options.get(k)!r}" for k in diff)
        raise UserError(f"{path}: this checkpoint was written with other options ({shown}); "
                        "rerun with the same options, or remove it to start fresh")
    return Checkpoint(fingerprint=d["fingerprint"], options=d["options"], step=int(d["step"]), weight=d["weight"],
                      b1=d["b1"], params=[float(v) for v in d["params"]], evaluations=int(d["evaluations"]),
                      steps_done=list(d.get("steps_done", [])), history=list(d.get("history", [])),
                      scaling=d.get("scaling"))
