"""Models by name (`model=`): each one maps parameters to utilities with dual-block operations.

    get_model("logit") -> Model      MODELS: the registry of models (estpipe.registry.Registry)
    Model.name, .n_params(K), .param_names(x_names), .start(K), .utilities(theta, X, seg)

Adding a model is one class written with the operations of estpipe.dual and one entry here.
"""

from __future__ import annotations

from estpipe.models.base import Model
from estpipe.models.logit import Logit
from estpipe.models.logit_signed import LogitSigned
from estpipe.models.mixed_logit import MixedLogit
from estpipe.models.nested_logit import NestedLogit
from estpipe.registry import Registry

MODELS: Registry[Model] = Registry("model", [Logit(), LogitSigned(), MixedLogit(), NestedLogit()])


def get_model(name: str) -> Model:
    """The model called `name`; a UserError listing the allowed names for an unknown one."""
    return resolve(name)


def resolve(name: str) -> Model:
    """A registered model by name, or the class `Class` of a user's file, named "path.py:Class"
    (models/user.py)."""
    if isinstance(name, Model):
        return name
    if ":" in name and name not in MODELS:
        from estpipe.models.user import load_user_model

        return load_user_model(name)
    return MODELS.get(name)


__all__ = ["MODELS", "Model", "get_model"]
