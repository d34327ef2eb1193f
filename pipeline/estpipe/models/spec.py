"""A model as the options name it, and the model it builds for a file's facts.

    spec = ModelSpec.of("mixed-logit", random="time,cost:-lognormal", draws=500)
    model = spec.build(facts)         # facts: x_names, alt_names, has_panel (a ChoiceProblem or a file)
    spec.key()                        # a short hash of everything that changes the model's sums

A user's file, "my_models.py:BoxCoxCost", is named by its absolute path (resolved once, here, on
the client), so workers in other folders find the same file, and its sha256 is the `digest`: an
edited file is another key, and a worker whose copy differs refuses it (models/user.py).

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
    """name: a registry name, "/abs/path.py:Class" or an installed model's name; options: sorted
    (name, value) pairs of the model options given; digest: the sha256 of a user's model file, or
    "package==version" of an installed model ("" for estpipe's own)."""

    name: str = "logit"
    options: tuple = ()
    digest: str = ""

    @classmethod
    def of(cls, name: str, base=None, **options) -> "ModelSpec":
        """name as given (a relative file is from `base`, default the current folder)."""
        from estpipe.models.user import absolute_name, file_digest, installed_digest, is_file_name, split_name

        given = tuple(sorted((k, v) for k, v in options.items() if v is not None))
        if not is_file_name(name):
            return cls(name=name, options=given, digest=installed_digest(name))
        name = absolute_name(name, base)
        return cls(name=name, options=given, digest=file_digest(split_name(name)[0]))

    def build(self, facts):
        """The model, bound to the data's facts; a UserError for an option it does not take or a
        fact the data lacks (naming the load option that would add it)."""
        from estpipe.models import resolve

        return resolve(self.name, self.digest).bind(facts, **dict(self.options))

    def key(self) -> str:
        text = json.dumps([self.name, [list(o) for o in self.options], self.digest], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def to_dict(self) -> dict:
        return {"name": self.name, "options": dict(self.options), "digest": self.digest}

