"""Models by name (`model=`): each one maps parameters to choice probabilities with dual-block
operations.

    get_model("logit") -> Model      MODELS: the registry of estpipe's own models (estpipe.registry.Registry)
    Model.name, .n_params(K), .param_names(x_names), .start(K), .utilities(theta, tile)
    model_problem(name)              why `name` names no model (None when it does)

A model is named by its registry name, as "path.py:Class" (a class in the user's own file), or
by the name a package installs it under (entry point group "estpipe.models"): models/user.py.
Adding a model to estpipe is one class written with the operations of estpipe.dual and one entry here.
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


def resolve(name, digest: str = "") -> Model:
    """A registered model by name, the class `Class` of a user's file named "path.py:Class"
    (digest: the sha256 the file must have, '' for any), or an installed model (models/user.py)."""
    if isinstance(name, Model):
        return name
    if name in MODELS:
        return MODELS[name]
    from estpipe.models.user import is_file_name, load_installed_model, load_user_model

    if is_file_name(name):
        return load_user_model(name, digest)
    installed = load_installed_model(name)
    if installed is not None:
        return installed
    return MODELS.get(name)  # the UserError listing the models


def model_problem(name) -> str | None:
    """Why `name` names no model (one line listing the choices), or None: a registered model, a
    user's file that exists ("path.py:Class"; importing it is left to resolve), or an installed one."""
    if name in MODELS:
        return None
    from estpipe.models.user import file_problem, installed_models, is_file_name

    if isinstance(name, str) and is_file_name(name):
        return file_problem(name)
    if isinstance(name, str) and name in installed_models():
        return None
    installed = sorted(installed_models())
    extra = f"; installed: {', '.join(installed)}" if installed else ""
    return (f"{MODELS.problem(name)}{extra}; or a model class in your own file: path/to/my_models.py:ClassName")


__all__ = ["MODELS", "Model", "get_model", "model_problem", "resolve"]
