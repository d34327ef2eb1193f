"""The user's own model: a class written with the estpipe.dual operations in the user's file, or
installed by a package.

    --model my_models.py:BoxCoxCost     the class BoxCoxCost of that file (relative to the current
                                        folder, made absolute once: models/spec.py)
    --model boxcox                      a model installed through the entry point group
                                        "estpipe.models" (importlib.metadata), e.g. in a package's
                                        pyproject.toml: [project.entry-points."estpipe.models"]
                                        boxcox = "mypkg.models:BoxCoxCost"

Workers import the same file (the ModelSpec that travels holds its absolute path and its sha256;
a worker whose copy differs refuses it), so on a cluster the file must sit on a path every node
reads, as the data does. The file's folder is on sys.path while it is imported, so it may import
modules beside it.

Every mistake is one line naming the file: a file that does not exist, a syntax error or an
exception while it is imported (file and line), no such class (the model classes it has), a class
that is not a model, and, once the model runs (models/base.py `call_model`), an exception inside
its utilities or probabilities (file, line, exception) or a block of the wrong shape.
"""

from __future__ import annotations

import copyreg
import hashlib
import importlib.metadata
import importlib.util
import inspect
import sys
import traceback
from pathlib import Path

from estpipe.errors import UserError
from estpipe.models.base import Model

ENTRY_POINT_GROUP = "estpipe.models"

# (absolute path, sha256) -> the imported module, so a file is imported once per process per content
_modules: dict[tuple[str, str], object] = {}


def is_file_name(name: str) -> bool:
    """Whether `name` names a class in a file ("path.py:Class"), not a registered or installed model."""
    path, sep, cls = str(name).rpartition(":")
    return bool(sep) and path.endswith(".py") and bool(cls)


def split_name(name: str) -> tuple[str, str]:
    """'dir/my_models.py:BoxCoxCost' -> ('dir/my_models.py', 'BoxCoxCost')."""
    path, _, cls = str(name).rpartition(":")
    return path, cls


def absolute_name(name: str, base: str | Path | None = None) -> str:
    """'my_models.py:Cls' with its path made absolute (relative to `base`, default the current
    folder); a registered or installed model's name as it is."""
    if not is_file_name(name):
        return name
    path, cls = split_name(name)
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = Path(base or Path.cwd()) / p
    return f"{p.resolve()}:{cls}"


def file_digest(path: str | Path) -> str:
    """The sha256 of the file's bytes ('' when it cannot be read)."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return ""


def file_problem(name: str) -> str | None:
    """Why the file of "path.py:Class" cannot be used (it does not exist, ...), or None."""
    path, cls = split_name(name)
    p = Path(path)
    if not p.exists():
        return (f"model {name}: no such file {p}; give the path of your Python file and the class in it, "
                "path/to/my_models.py:ClassName (a relative path is from the current folder)")
    if not p.is_file():
        return f"model {name}: {p} is not a file; give path/to/my_models.py:ClassName"
    return None


def load_user_model(name: str, digest: str = "") -> Model:
    """An instance of the Model subclass `Class` in the file of "path.py:Class"; digest: the
    sha256 the file must have ('' = any), so a worker never runs another version of the file."""
    problem = file_problem(name)
    if problem:
        raise UserError(problem)
    path_text, class_name = split_name(name)
    path = Path(path_text).resolve()
    actual = file_digest(path)
    if digest and actual != digest:
        raise UserError(f"model {name}: {path} changed since the run started (its sha256 is not the one the run "
                        "was started with); on a cluster every node must read the same file: keep it unchanged "
                        "while the run lasts, or start the run again")
    module = _import_file(name, path, actual)
    cls = getattr(module, class_name, None)
    if cls is None:
        found = _model_classes(module)
        has = (f"the model classes in it: {', '.join(found)}" if found else
               "it defines no model class (class MyModel(estpipe.models.Model) with utilities or probabilities)")
        raise UserError(f"model {name}: {path} has no class {class_name}; {has}")
    return _instance(name, cls, f"{class_name} in {path}", source=(str(path), class_name, actual))


def installed_models() -> dict[str, importlib.metadata.EntryPoint]:
    """The models installed by packages: entry points of the group "estpipe.models", by name."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def installed_digest(name: str) -> str:
    """"package==version" of the package that installs the model `name` ('' for none)."""
    from estpipe.models import MODELS

    if name in MODELS:
        return ""
    ep = installed_models().get(name)
    dist = getattr(ep, "dist", None) if ep is not None else None
    return f"{dist.name}=={dist.version}" if dist is not None else ""


def load_installed_model(name: str) -> Model | None:
    """The installed model `name` (an entry point of "estpipe.models" naming a Model subclass or
    instance), or None when no package installs one of that name."""
    ep = installed_models().get(name)
    if ep is None:
        return None
    try:
        obj = ep.load()
    except Exception as exc:
        raise UserError(f"model {name}: loading the installed model {ep.value} (entry point {ENTRY_POINT_GROUP}) "
                        f"raised {_exception_text(exc)}{_where(exc, None)}; fix or reinstall that package") from None
    if isinstance(obj, Model):
        return obj
    return _instance(name, obj, f"{ep.value} (entry point {ENTRY_POINT_GROUP} {name})")


def _instance(name: str, cls, what: str, source=None) -> Model:
    if not (isinstance(cls, type) and issubclass(cls, Model)):
        kind = "a class" if isinstance(cls, type) else f"a {type(cls).__name__}"
        raise UserError(f"model {name}: {what} is {kind} but not a model; a model is a subclass of "
                        "estpipe.models.Model with utilities(theta, tile) or probabilities(theta, tile)")
    if cls.utilities is Model.utilities and cls.probabilities is Model.probabilities:
        raise UserError(f"model {name}: {what} defines neither utilities(theta, tile) nor probabilities(theta, tile); "
                        "a model needs one of them")
    try:
        model = cls()
    except Exception as exc:
        raise UserError(f"model {name}: creating {what} raised {_exception_text(exc)}{_where(exc, source and source[0])}; "
                        "a model class must be created without arguments (options go to its bind)") from None
    if not model.name:
        model.name = name
    if source is not None:
        copyreg.pickle(cls, _reduce_user_model)
        cls._estpipe_source = source
    return model


def _import_file(name: str, path: Path, digest: str):
    key = (str(path), digest)
    if key in _modules:
        return _modules[key]
    module_name = f"estpipe_user_{digest[:16]}_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    folder = str(path.parent)
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        del sys.modules[module_name]
        line = f" line {exc.lineno}" if exc.lineno else ""
        where = exc.filename if exc.filename and exc.filename != str(path) else str(path)
        raise UserError(f"model {name}: {where}{line}: syntax error: {exc.msg}; fix the file") from None
    except Exception as exc:
        del sys.modules[module_name]
        raise UserError(f"model {name}: importing {path} raised {_exception_text(exc)}{_where(exc, path)}; "
                        "fix the file") from None
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)
    _modules[key] = module
    return module


def _model_classes(module) -> list[str]:
    """The Model subclasses defined in (not imported into) the module."""
    return [n for n, obj in vars(module).items()
            if isinstance(obj, type) and issubclass(obj, Model) and obj.__module__ == module.__name__]


def _exception_text(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text and text[0] else type(exc).__name__


def _frame(exc: BaseException, path):
    """The innermost frame of the traceback in the file `path` (or, with path None, the innermost
    frame outside estpipe), or None."""
    frames = traceback.extract_tb(exc.__traceback__)
    if path is not None:
        mine = [f for f in frames if Path(f.filename) == Path(path)]
    else:
        package = str(Path(__file__).resolve().parents[1])
        mine = [f for f in frames if not f.filename.startswith(package) and not f.filename.startswith("<")]
    return mine[-1] if mine else None


def _where(exc: BaseException, path) -> str:
    """' at FILE line N (in FUNCTION)' of _frame, or ''."""
    f = _frame(exc, path)
    return "" if f is None else f" at {f.filename} line {f.lineno} (in {f.name})"


def model_source_file(model) -> str | None:
    """The file a user's model class was defined in, or None for estpipe's own models."""
    try:
        path = inspect.getsourcefile(type(model))
    except TypeError:
        return None
    if path is None:
        return None
    package = str(Path(__file__).resolve().parents[1])
    return None if str(Path(path).resolve()).startswith(package) else str(Path(path).resolve())


def model_error(model, method: str, exc: BaseException) -> UserError:
    """The one line for an exception raised inside a user's model while it ran `method`."""
    path = model_source_file(model)
    f = _frame(exc, path)
    where = f" at {f.filename} line {f.lineno}" if f is not None else f" (in {path})"
    function = f.name if f is not None else method
    return UserError(f"model {model.name}: {function} raised {_exception_text(exc)}{where}; fix the model "
                     f"(estpipe called its {method}(theta, tile))")


def _rebuild_user_model(source, state):
    path, class_name, digest = source
    model = load_user_model(f"{path}:{class_name}", digest)
    model.__dict__.update(state)
    return model


def _reduce_user_model(model):
    """Pickle a user's model by its file, class and sha256 (a process that unpickles it imports the
    file itself), never by the name of a module that exists only in this process."""
    return _rebuild_user_model, (type(model)._estpipe_source, dict(model.__dict__))
