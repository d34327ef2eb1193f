"""The user's own model: a class written with the estpipe.dual operations in the user's file,
named on the command line as `my_models.py:BoxCoxCost` (workers import the same file: on a
cluster it must sit on the shared path, as the data does)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from estpipe.errors import UserError
from estpipe.models.base import Model


def load_user_model(name: str) -> Model:
    """An instance of the Model subclass `Class` in the file of "path.py:Class"."""
    path_text, _, class_name = name.rpartition(":")
    path = Path(path_text)
    if not path.is_file():
        raise UserError(f"model {name}: no such file {path}; give path/to/file.py:ClassName")
    module_name = f"estpipe_user_model_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    cls = getattr(module, class_name, None)
    if cls is None:
        raise UserError(f"model {name}: {path} has no class {class_name}")
    if not (isinstance(cls, type) and issubclass(cls, Model)):
        raise UserError(f"model {name}: {class_name} in {path} is not a model (a subclass of estpipe.models.Model)")
    model = cls()
    if not model.name:
        model.name = name
    return model
