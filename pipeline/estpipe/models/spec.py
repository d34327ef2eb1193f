"""A model as the options name it, and the model it builds for a file's facts.

    spec = ModelSpec.of("mixed-logit", random="time,cost:-lognormal", draws=500)
    model = spec.build(facts)         # facts: x_names, alt_names, has_panel (a ChoiceProblem or a file)
    spec.key()                        # a short hash of everything that changes the model's sums

A spec is small and frozen, so it travels to dask workers, which build the same model from the
file they read; `key()` goes into the resident partitions' keys and the checkpoint's options, so
a long-lived cluster or a resumed run never reuses a kernel or a checkpoint of other draws, other
options or an edited model file (`digest`: the hash of a user's model file).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    """name: a registry name or "path.py:Class"; options: sorted (name, value) pairs of the model
    options given; digest: the sha256 of a user's model file ("" for installed models)."""

    name: str = "logit"
    options: tuple = ()
    digest: str = ""

    @classmethod
    def of(cls, name: str, **options) -> "ModelSpec":
        given = tuple(sorted((k, v) for k, v in options.items() if v is not None))
        return cls(name=name, options=given, digest=_digest(name))

    def build(self, facts):
        """The model, bound to the data's facts; a UserError for an option it does not take or a
        fact the data lacks (naming the load option that would add it)."""
        from estpipe.models import resolve

        return resolve(self.name).bind(facts, **dict(self.options))

    def key(self) -> str:
        text = json.dumps([self.name, [list(o) for o in self.options], self.digest], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def to_dict(self) -> dict:
        return {"name": self.name, "options": dict(self.options), "digest": self.digest}


def _digest(name: str) -> str:
    """The sha256 of a user model file named as "path.py:Class" ("" for a registry name or a file
    that cannot be read: resolving it then says why)."""
    if ":" not in name:
        return ""
    path = name.rsplit(":", 1)[0]
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return ""
