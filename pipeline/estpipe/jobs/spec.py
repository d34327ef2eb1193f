"""Job specs: one TOML file says which data, which estimate options, where it runs, where results go.

    [data]      path = "data.h5" and either a simulate spec (design, sets, alternatives, params,
                moments, seed, cluster_size; mixed-logit: random, correlated, panel_size;
                nested-logit: nests) or `input` plus load options (set_col, choice_col, x, z, dm,
                alt_col, asc, asc_base, cluster_col, panel_col)
    [estimate]  the options of `estpipe estimate` that change the estimate, and max_iter and
                partitions (ESTIMATE_KEYS), checked by EstimateOptions as on the command line
    [backend]   kind = local | dask | a batch system of execution.jobqueue.KINDS (slurm, pbs), and
                what that kind needs; dashboard = true serves the dask dashboard (off by default)
    [output]    results, checkpoint, logs

Relative paths resolve against the spec's folder. `load_job_spec` collects EVERY problem of a spec
and raises them together in one `UserError`, one line per problem (field, value, what is allowed).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from estpipe.data.simulate import DESIGNS
from estpipe.errors import UserError, vocabulary
from estpipe.execution.jobqueue import KINDS
from estpipe.orchestration.options import RESULT_OPTIONS, EstimateOptions
from estpipe.registry import did_you_mean
from estpipe.text import count

BACKEND_KINDS = ("local", "dask") + KINDS.names

SIMULATE_KEYS = ("path", "design", "sets", "alternatives", "params", "moments", "seed", "cluster_size", "random",
                 "correlated", "panel_size", "nests")
LOAD_KEYS = ("path", "input", "set_col", "choice_col", "x", "z", "dm", "alt_col", "asc", "asc_base", "cluster_col",
             "panel_col")
# The estimate options a job fixes: those that change the estimate, how long it may run and in how
# many pieces. Where it runs and where its output goes come from [backend] and [output].
ESTIMATE_KEYS = RESULT_OPTIONS + ("max_iter", "partitions")
BATCH_KEYS = ("kind", "nodes", "workers", "cores", "memory", "walltime", "account", "setup", "interface", "worker_timeout",
              "dashboard")
BACKEND_KEYS = {
    "local": ("kind", "workers", "dashboard"),
    "dask": ("kind", "address", "scheduler_file", "dashboard"),
    "slurm": BATCH_KEYS + ("partition",),
    "pbs": BATCH_KEYS + ("queue",),
}
OUTPUT_KEYS = ("results", "checkpoint", "logs")
TABLES = ("data", "estimate", "backend", "output")
TOP_KEYS = ("name",)

_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]i?[bB]?|[bB])?\s*$")
_WALLTIME = re.compile(r"^(?:(\d+)-)?(\d{1,3}):(\d{2}):(\d{2})$")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class SimulateSpec:
    """Data made by `estpipe simulate` (`simulate_choice_data`) when `path` is missing."""

    path: Path
    design: str = "logit"
    sets: int = 1000
    alternatives: tuple[int, int] = (30, 30)
    params: int = 20
    moments: int = 40
    seed: int = 0
    cluster_size: int | None = None
    random: str | None = None
    correlated: bool = False
    panel_size: int | None = None
    nests: int | None = None

    def arguments(self) -> dict:
        """The keyword arguments of simulate_choice_data(path, ...) that make this data."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "path"}


@dataclass(frozen=True)
class LoadSpec:
    """Data converted by `estpipe load` (`load_choice_data`) from `input` when `path` is missing."""

    path: Path
    input: Path
    set_col: str
    choice_col: str
    x: tuple[str, ...]
    z: tuple[str, ...] | None = None
    dm: tuple[str, ...] | None = None
    alt_col: str | None = None
    asc: bool = False
    asc_base: str | None = None
    cluster_col: str | None = None
    panel_col: str | None = None

    def arguments(self) -> dict:
        """The keyword arguments of load_choice_data(input, path, ...) that make this data."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("path", "input")}


@dataclass(frozen=True)
class BackendSpec:
    """Where the estimation runs. `workers` is the total number of dask worker processes."""

    kind: str = "local"
    workers: int = 1
    address: str | None = None
    scheduler_file: Path | None = None
    nodes: int = 1
    cores: int = 1
    memory: str = "2GB"
    walltime: str = "01:00:00"
    partition: str | None = None
    queue: str | None = None
    account: str | None = None
    setup: tuple[str, ...] = ()
    interface: str | None = None
    worker_timeout: int = 300
    # the dask dashboard: served on loopback by the scheduler the job starts (an ssh tunnel reaches
    # it), its address in the log; off by default
    dashboard: bool = False

    @property
    def memory_mb(self) -> int:
        """`memory` in MB (1000-based like dask's "2GB"; "2GiB" is 1024-based)."""
        return memory_megabytes(self.memory)


@dataclass(frozen=True)
class OutputSpec:
    results: Path
    checkpoint: Path
    logs: Path


@dataclass(frozen=True)
class JobSpec:
    """A checked job spec; every path is absolute."""

    source: Path
    name: str
    data: SimulateSpec | LoadSpec
    estimate: EstimateOptions  # the [estimate] table over estimate's defaults
    estimate_keys: tuple[str, ...]  # the fields [estimate] sets, in its order (batch scripts pass these)
    backend: BackendSpec
    output: OutputSpec
    raw: dict = field(default_factory=dict, repr=False, compare=False)


def memory_megabytes(text: str) -> int:
    """"2GB" -> 2000, "1500MB" -> 1500, "2GiB" -> 2147; raises ValueError when unreadable."""
    match = _MEMORY.match(str(text))
    if not match:
        raise ValueError(text)
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return max(1, int(number * base**power / 1000**2))


class _Problems:
    """Collects one line per problem; `raise_if_any` raises them together."""

    def __init__(self, source: Path):
        self.source = source
        self.lines: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.lines.append(f"{where}: {message}")

    def line(self, message: str) -> None:
        """A problem whose message names its field itself."""
        self.lines.append(message)

    def bad(self, where: str, value: Any, allowed: str) -> None:
        self.add(where, f"{_show(value)} is not allowed; {allowed}")

    def raise_if_any(self) -> None:
        if self.lines:
            n = len(self.lines)
            header = f"job spec {self.source} has {n} problem{'s' if n > 1 else ''}:"
            raise UserError("\n".join([header] + [f"  {line}" for line in self.lines]))


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    return repr(value)


class _Table:
    """Typed reads of one TOML table; every mistake goes to the shared problem list."""

    def __init__(self, name: str, values: dict, problems: _Problems, base: Path):
        self.name, self.values, self.problems, self.base = name, values, problems, base

    def where(self, key: str) -> str:
        return f"{self.name}.{key}"

    def check_keys(self, allowed: tuple[str, ...], context: str = "") -> None:
        for key in self.values:
            if key not in allowed:
                self.problems.add(
                    self.where(key),
                    f"unknown key{context}{did_you_mean(key, allowed)}; allowed: {', '.join(allowed)}",
                )

    def has(self, key: str) -> bool:
        return key in self.values

    def string(self, key: str, default=None, *, required=False, choices: tuple[str, ...] | None = None):
        if key not in self.values:
            if required:
                self.problems.add(self.where(key), "missing; " + (f"one of {', '.join(choices)}" if choices else "a string is required"))
            return default
        value = self.values[key]
        if not isinstance(value, str) or (choices is None and not value.strip()):
            self.problems.bad(self.where(key), value, "a non-empty string is required")
            return default
        if choices is not None and value not in choices:
            self.problems.bad(self.where(key), value, f"one of {', '.join(choices)}{did_you_mean(value, choices)}")
            return default
        return value

    def integer(self, key: str, default=None, *, minimum: int = 1):
        if key not in self.values:
            return default
        value = self.values[key]
        if isinstance(value, bool) or not isinstance(value, int):
            self.problems.bad(self.where(key), value, f"a whole number >= {minimum} is required")
            return default
        if value < minimum:
            self.problems.bad(self.where(key), value, f"a whole number >= {minimum} is required")
            return default
        return value

    def boolean(self, key: str, default=False):
        if key not in self.values:
            return default
        value = self.values[key]
        if not isinstance(value, bool):
            self.problems.bad(self.where(key), value, "true or false")
            return default
        return value

    def path(self, key: str, default=None, *, required=False):
        text = self.string(key, None, required=required)
        if text is None:
            return default
        path = Path(text).expanduser()
        return (path if path.is_absolute() else self.base / path).resolve()

    def names(self, key: str, *, required=False) -> tuple[str, ...] | None:
        """A list of column names, or one comma-separated string."""
        if key not in self.values:
            if required:
                self.problems.add(self.where(key), "missing; a list of column names is required")
            return None
        value = self.values[key]
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",")]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            self.problems.bad(self.where(key), value, "a non-empty list of column names")
            return None
        return tuple(value)

    def strings(self, key: str) -> tuple[str, ...]:
        if key not in self.values:
            return ()
        value = self.values[key]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.problems.bad(self.where(key), value, "a list of strings (shell lines)")
            return ()
        return tuple(value)


def _table(raw: dict, name: str, problems: _Problems, base: Path) -> _Table:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        problems.bad(name, value, f"[{name}] must be a table")
        value = {}
    return _Table(name, value, problems, base)


def _alternatives(table: _Table) -> tuple[int, int]:
    if not table.has("alternatives"):
        return (30, 30)
    value = table.values["alternatives"]
    lo = hi = None
    if isinstance(value, int) and not isinstance(value, bool):
        lo = hi = value
    elif isinstance(value, str) and re.fullmatch(r"\d+(:\d+)?", value.strip()):
        parts = [int(p) for p in value.strip().split(":")]
        lo, hi = parts[0], parts[-1]
    elif isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        lo, hi = value
    if lo is None or lo < 1 or hi < lo:
        table.problems.bad(table.where("alternatives"), value, 'a count like 30, or a range "2:30" or [2, 30] with 1 <= min <= max')
        return (30, 30)
    return (lo, hi)


def _data(table: _Table) -> SimulateSpec | LoadSpec | None:
    if not table.has("path"):
        table.problems.add("data.path", 'missing; give the choice-data file (HDF5) to use or make, e.g. path = "data.h5"')
    path = table.path("path")
    if table.has("input"):
        table.check_keys(LOAD_KEYS, " for loaded data (an `input` is given)")
        source = table.path("input")
        set_col = table.string("set_col", required=True)
        choice_col = table.string("choice_col", required=True)
        x = table.names("x", required=True)
        z, dm = table.names("z"), table.names("dm")
        if z and dm:
            table.problems.add("data.z", "give either z (instruments) or dm (moment columns), not both")
        asc = table.boolean("asc")
        asc_base = table.values.get("asc_base")
        if asc_base is not None and (not isinstance(asc_base, (str, int)) or isinstance(asc_base, bool)):
            table.problems.bad("data.asc_base", asc_base, "a level of alt_col (string or number)")
            asc_base = None
        alt_col = table.string("alt_col")
        if (asc or asc_base is not None) and alt_col is None:
            table.problems.add("data.asc", "asc needs alt_col (the column naming each alternative)")
        cluster_col = table.string("cluster_col")
        panel_col = table.string("panel_col")
        if source is not None and path is not None and not path.exists() and not source.exists():
            table.problems.add("data.input", f"{str(source)!r} does not exist (and data.path {str(path)!r} is not made yet); give the CSV or Parquet file to load")
        if None in (path, source, set_col, choice_col, x):
            return None
        return LoadSpec(path=path, input=source, set_col=set_col, choice_col=choice_col, x=x, z=z, dm=dm,
                        alt_col=alt_col, asc=asc, asc_base=None if asc_base is None else str(asc_base),
                        cluster_col=cluster_col, panel_col=panel_col)
    table.check_keys(SIMULATE_KEYS, " for simulated data (no `input` is given)")
    design = table.string("design", "logit", choices=DESIGNS.names)
    sets = table.integer("sets", 1000)
    alternatives = _alternatives(table)
    params = table.integer("params", 20)
    moments = table.integer("moments", 40)
    seed = table.integer("seed", 0, minimum=0)
    cluster_size = table.integer("cluster_size")
    random = table.values.get("random")
    if isinstance(random, int) and not isinstance(random, bool) and random >= 1:
        random = str(random)
    elif random is not None:
        names = table.names("random")  # a list of columns or one comma-separated string
        random = ",".join(names) if names else None
    correlated = table.boolean("correlated")
    panel_size = table.integer("panel_size")
    nests = table.integer("nests")
    for key, value, allowed in (("random", random, "mixed-logit"), ("correlated", correlated or None, "mixed-logit"),
                                ("panel_size", panel_size, "mixed-logit"), ("nests", nests, "nested-logit")):
        if value is not None and design != allowed:
            table.problems.add(f"data.{key}", f"is for design {allowed!r}, not {design!r}")
    if cluster_size is not None and design in ("mixed-logit", "nested-logit"):
        table.problems.add("data.cluster_size", f"is for the logit design, not {design!r}"
                           + (" (decision makers: panel_size)" if design == "mixed-logit" else ""))
    if params is not None and moments is not None and moments < params and table.has("moments"):
        table.problems.bad("data.moments", moments, f"moments must be >= params ({params})")
    if path is None:
        return None
    return SimulateSpec(path=path, design=design, sets=sets, alternatives=alternatives, params=params,
                        moments=moments, seed=seed, cluster_size=cluster_size, random=random, correlated=correlated,
                        panel_size=panel_size, nests=nests)


def _estimate(table: _Table) -> tuple[EstimateOptions, tuple[str, ...]]:
    """[estimate] as EstimateOptions, checked by the code that checks `estpipe estimate`'s options;
    its messages name the spec's fields (estimate.optimizer)."""
    values = dict(table.values)
    if isinstance(values.get("model"), str):
        # a model file ("my_models.py:BoxCoxCost") is relative to the spec's folder, as the data is
        from estpipe.models.user import absolute_name

        values["model"] = absolute_name(values["model"], table.base)
    with vocabulary(lambda argument: f"{table.name}.{argument}"):
        options, problems = EstimateOptions.parse(values, allowed=ESTIMATE_KEYS)
        for problem in problems:
            table.problems.line(problem.message)
    return options, tuple(key for key in table.values if key in ESTIMATE_KEYS)


def _backend(table: _Table) -> BackendSpec | None:
    kind = table.values.get("kind", "local")
    if kind not in BACKEND_KINDS:
        table.problems.bad("backend.kind", kind, f"one of {', '.join(BACKEND_KINDS)}{did_you_mean(str(kind), BACKEND_KINDS)}")
        return None
    hint = {"slurm": " (Slurm calls it partition)", "pbs": " (PBS calls it queue)"}.get(kind, "")
    table.check_keys(BACKEND_KEYS[kind], f" for kind {kind!r}{hint if {'queue', 'partition'} & set(table.values) else ''}")
    dashboard = table.boolean("dashboard")
    if kind == "local":
        workers = table.integer("workers", 1)
        if dashboard and workers == 1:
            table.problems.add("backend.dashboard", "shows a dask cluster's work, and workers = 1 runs in-process "
                                                    "without one; set backend.workers above 1 or leave out dashboard")
        return BackendSpec(kind=kind, workers=workers, dashboard=dashboard)
    if kind == "dask":
        address, scheduler_file = table.string("address"), table.path("scheduler_file")
        if not table.has("address") and not table.has("scheduler_file"):
            table.problems.add("backend", "kind 'dask' needs address (tcp://host:port) or scheduler_file")
        elif table.has("address") and table.has("scheduler_file"):
            table.problems.add("backend", "give either address or scheduler_file, not both")
        return BackendSpec(kind=kind, address=address, scheduler_file=scheduler_file, dashboard=dashboard)
    nodes = table.integer("nodes", 1)
    workers = table.integer("workers", 2)
    memory = table.values.get("memory", "2GB")
    try:
        memory_megabytes(memory)
    except (ValueError, TypeError):
        table.problems.bad("backend.memory", memory, 'memory per worker like "2GB", "1500MB" or "4GiB"')
        memory = "2GB"
    walltime = table.values.get("walltime", "01:00:00")
    if not isinstance(walltime, str) or not _WALLTIME.match(walltime):
        table.problems.bad("backend.walltime", walltime, 'a time like "HH:MM:SS" or "D-HH:MM:SS"')
        walltime = "01:00:00"
    if kind == "pbs" and nodes and workers and workers % nodes:
        table.problems.add("backend.workers", f"{count(workers, 'worker')} do not split evenly over {count(nodes, 'PBS node')}; use a multiple of nodes")
    if nodes and workers and workers < nodes:
        table.problems.add("backend.nodes", f"{count(nodes, 'node')} for {count(workers, 'worker')}; ask for at most one node per worker")
    return BackendSpec(
        kind=kind, nodes=nodes, workers=workers, cores=table.integer("cores", 1), memory=str(memory),
        walltime=walltime, partition=table.string("partition"), queue=table.string("queue"),
        account=table.string("account"), setup=table.strings("setup"), interface=table.string("interface"),
        worker_timeout=table.integer("worker_timeout", 300), dashboard=dashboard,
    )


def _output(table: _Table, name: str) -> OutputSpec:
    table.check_keys(OUTPUT_KEYS)
    results = table.path("results", table.base / "results" / f"{name}.json")
    checkpoint = table.path("checkpoint", results.with_name(results.stem + ".checkpoint.json"))
    logs = table.path("logs", table.base / "logs")
    return OutputSpec(results=results, checkpoint=checkpoint, logs=logs)


def parse_job_spec(raw: dict, source: Path) -> JobSpec:
    """Check a parsed TOML document; raise one UserError listing every problem."""
    source = Path(source).resolve()
    base = source.parent
    problems = _Problems(source)
    for key, value in raw.items():
        if key in TABLES or key in TOP_KEYS:
            continue
        kind = "table" if isinstance(value, dict) else "key"
        problems.add(key, f"unknown {kind}{did_you_mean(key, TABLES + TOP_KEYS)}; allowed: name = \"...\" and the tables {', '.join(f'[{t}]' for t in TABLES)}")
    name = raw.get("name", source.stem)
    if not isinstance(name, str) or not _NAME.match(name):
        problems.bad("name", name, "letters, digits, '.', '_' and '-' only (it names the batch job)")
        name = "estpipe"
    if "data" not in raw:
        problems.add("data", "missing table; give [data] with path = \"...h5\" and a simulate spec or an input to load")
    data = _data(_table(raw, "data", problems, base)) if "data" in raw else None
    estimate, estimate_keys = _estimate(_table(raw, "estimate", problems, base))
    backend = _backend(_table(raw, "backend", problems, base))
    output = _output(_table(raw, "output", problems, base), name)
    problems.raise_if_any()
    return JobSpec(source=source, name=name, data=data, estimate=estimate, estimate_keys=estimate_keys,
                   backend=backend, output=output, raw=raw)


def load_job_spec(path: str | Path) -> JobSpec:
    """Read and check a job spec file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"job spec {str(path)!r} does not exist; give a TOML file such as jobs/seed.toml")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"job spec {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise UserError(f"job spec {path} is not a text (UTF-8) TOML file") from None
    return parse_job_spec(raw, path)
