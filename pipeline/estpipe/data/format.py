"""The choice-data file, HDF5 format version 1 (DESIGN.md, "Choice-data file").

Set i owns rows offsets[i]:offsets[i+1] of `X` (n_rows, K) and `dm` (n_rows, M). A reader returns
any range of sets without reading the rest of the file; sizes, names and provenance come from
attributes alone. A writer streams row chunks into a temporary file in the target folder and
renames it at the end, so a failed run leaves nothing under the final name.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from estpipe import interrupts, outputs
from estpipe.errors import UserError

FORMAT_NAME = "choice-data"
FORMAT_VERSION = 1
DEFAULT_CHUNK_ROWS = 16384
REQUIRED_DATASETS = ("offsets", "X", "dm")
# Column names are stored as one HDF5 attribute each for X and dm, and an attribute (in the
# default, compact storage) holds at most 64 KiB: 16 bytes per name reference, so about 4,000.
MAX_COLUMNS = 4000
# Bytes of one HDF5 chunk of X or dm at most (16,384 rows of up to 128 columns).
MAX_CHUNK_BYTES = 16 * 2**20
REQUIRED_ATTRS = ("n_sets", "n_rows", "n_params", "n_moments", "param_names", "moment_names")
# The largest |value| X and dm may hold: its square (in the h h' sums of S and the Gauss-Newton
# products) must fit in float64 (1.8e308). `estpipe load` and every partition read refuse more.
MAX_ABS_VALUE = 1e154


def _h5py():
    import h5py

    return h5py


@dataclass
class ChoiceData:
    """Choice sets in memory: a whole file or a contiguous range of its sets.

    X: (n_rows, K) covariates; dm: (n_rows, M) moment vectors; offsets: (n_sets + 1,) with
    offsets[0] = 0; chosen: (n_rows,) int8 or None; cluster: (n_sets,) int64 or None; alt:
    (n_rows,) int32 alternative codes (0 .. len(alt_names) - 1) or None; panel: (n_sets,) int64
    the decision maker (panel unit) of each set, each unit's sets contiguous, or None.
    """

    X: np.ndarray
    dm: np.ndarray
    offsets: np.ndarray
    chosen: np.ndarray | None = None
    cluster: np.ndarray | None = None
    alt: np.ndarray | None = None
    panel: np.ndarray | None = None
    first_set: int = 0  # the file's index of this data's first set (a partition's offset)

    @property
    def n_sets(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_rows(self) -> int:
        return int(self.offsets[-1])

    @property
    def K(self) -> int:
        return self.X.shape[1]

    @property
    def M(self) -> int:
        return self.dm.shape[1]

    @property
    def nbytes(self) -> int:
        extra = sum(a.nbytes for a in (self.chosen, self.cluster, self.alt, self.panel) if a is not None)
        return self.X.nbytes + self.dm.nbytes + self.offsets.nbytes + extra


def provenance(command: str, **details) -> dict:
    """How a file was made: command, its options, estpipe version, time, python."""
    from estpipe import __version__

    return {
        "command": command,
        **details,
        "estpipe_version": __version__,
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
    }


class ChoiceDataFile:
    """An open choice-data file, checked on open. Use as a context manager or call close().

    Attributes read without touching the arrays: n_sets, n_rows, K, M, param_names,
    moment_names, provenance, has_chosen, has_cluster, has_alt, alt_names, has_panel, truth,
    truth_names, nests. `offsets` (n_sets + 1,) is read once on open (it is small: 8 bytes per
    set) and checked, and so are the panel units (8 bytes per set) when the file has them.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise UserError(f"{self.path}: no such file; make one with `estpipe simulate` or `estpipe load`")
        if self.path.is_dir():
            raise UserError(f"{self.path}: is a folder, not a choice-data file")
        h5py = _h5py()
        if not h5py.is_hdf5(self.path):
            raise UserError(
                f"{self.path}: not an HDF5 file; estpipe reads choice-data files made by "
                "`estpipe simulate` or `estpipe load` (CSV or Parquet go through `estpipe load`)"
            )
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as exc:
            raise UserError(f"{self.path}: cannot be opened as HDF5 ({exc}); the file may be truncated or damaged") from None
        try:
            self._check()
        except BaseException:
            self._f.close()
            raise

    # -- checks -------------------------------------------------------------------------------
    def _check(self) -> None:
        f, p = self._f, self.path
        fmt = f.attrs.get("estpipe_format")
        if isinstance(fmt, bytes):
            fmt = fmt.decode()
        if fmt != FORMAT_NAME:
            raise UserError(
                f"{p}: an HDF5 file but not an estpipe choice-data file (attribute estpipe_format is "
                f"{fmt!r}, expected {FORMAT_NAME!r}); convert the data with `estpipe load`"
            )
        version = f.attrs.get("estpipe_format_version")
        if version is None:
            raise UserError(f"{p}: attribute estpipe_format_version is missing; rewrite the file with `estpipe load`")
        if int(version) != FORMAT_VERSION:
            newer = "a newer estpipe" if int(version) > FORMAT_VERSION else "an older estpipe"
            raise UserError(
                f"{p}: choice-data format version {int(version)}, but this estpipe reads version "
                f"{FORMAT_VERSION}; it was written by {newer}: use that version or rewrite the file"
            )
        for name in REQUIRED_ATTRS:
            if name not in f.attrs:
                raise UserError(f"{p}: attribute {name!r} is missing; the file is incomplete, rewrite it")
        for name in REQUIRED_DATASETS:
            if name not in f:
                raise UserError(f"{p}: dataset {name!r} is missing; the file is incomplete, rewrite it")
        self.n_sets = int(f.attrs["n_sets"])
        self.n_rows = int(f.attrs["n_rows"])
        self.K = int(f.attrs["n_params"])
        self.M = int(f.attrs["n_moments"])
        self.param_names = [str(s) for s in f.attrs["param_names"]]
        self.moment_names = [str(s) for s in f.attrs["moment_names"]]
        raw = f.attrs.get("provenance", "{}")
        try:
            self.provenance = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        except (json.JSONDecodeError, TypeError):
            self.provenance = {"raw": str(raw)}
        X, dm, off = f["X"], f["dm"], f["offsets"]
        if X.shape != (self.n_rows, self.K):
            raise UserError(f"{p}: dataset X has shape {X.shape}, expected (n_rows, n_params) = {(self.n_rows, self.K)}; rewrite the file")
        if dm.shape != (self.n_rows, self.M):
            raise UserError(f"{p}: dataset dm has shape {dm.shape}, expected (n_rows, n_moments) = {(self.n_rows, self.M)}; rewrite the file")
        if off.shape != (self.n_sets + 1,):
            raise UserError(f"{p}: dataset offsets has shape {off.shape}, expected (n_sets + 1,) = ({self.n_sets + 1},); rewrite the file")
        if len(self.param_names) != self.K or len(self.moment_names) != self.M:
            raise UserError(f"{p}: {len(self.param_names)} param_names for K = {self.K} and {len(self.moment_names)} moment_names for M = {self.M}; rewrite the file")
        try:
            offsets = off[...].astype(np.int64)
        except OSError as exc:
            raise UserError(f"{p}: dataset offsets cannot be read ({exc}); the file is truncated or damaged") from None
        if offsets[0] != 0:
            raise UserError(f"{p}: offsets[0] is {offsets[0]}, expected 0; rewrite the file")
        steps = np.diff(offsets)
        if steps.size and steps.min() <= 0:
            i = int(np.argmin(steps > 0))
            raise UserError(
                f"{p}: offsets are not strictly increasing at set {i} "
                f"(offsets[{i}] = {offsets[i]}, offsets[{i + 1}] = {offsets[i + 1]}); every set needs at least one row"
            )
        if offsets[-1] != self.n_rows:
            raise UserError(f"{p}: offsets end at {offsets[-1]} but the file has n_rows = {self.n_rows}; rewrite the file")
        self.offsets = offsets
        self.has_chosen = "chosen" in f
        self.has_cluster = "cluster" in f
        self.has_alt = "alt" in f
        self._has_panel = "panel" in f
        self.truth = f["truth/params"][...].astype(np.float64) if "truth/params" in f else None
        self.truth_names = _strings(f.attrs["truth_names"]) if "truth_names" in f.attrs else None
        self._alt_names = _strings(f.attrs["alt_names"]) if "alt_names" in f.attrs else None
        nests = f.attrs.get("nests")
        self.nests = (nests.decode() if isinstance(nests, bytes) else str(nests)) if nests is not None else None
        if self.has_chosen and f["chosen"].shape != (self.n_rows,):
            raise UserError(f"{p}: dataset chosen has shape {f['chosen'].shape}, expected ({self.n_rows},); rewrite the file")
        if self.has_cluster and f["cluster"].shape != (self.n_sets,):
            raise UserError(f"{p}: dataset cluster has shape {f['cluster'].shape}, expected ({self.n_sets},); rewrite the file")
        if self.truth is not None:
            # truth/params is in the order of the simulated model's parameters, named by the
            # attribute truth_names (files before it hold the K coefficients of the logit)
            if self.truth_names is None:
                if self.truth.shape != (self.K,):
                    raise UserError(f"{p}: dataset truth/params has shape {self.truth.shape}, expected ({self.K},); rewrite the file")
                self.truth_names = list(self.param_names)
            elif self.truth.shape != (len(self.truth_names),):
                raise UserError(f"{p}: dataset truth/params has shape {self.truth.shape} but the file names "
                                f"{len(self.truth_names)} true parameters (attribute truth_names); rewrite the file")
        if self.has_alt:
            if f["alt"].shape != (self.n_rows,):
                raise UserError(f"{p}: dataset alt has shape {f['alt'].shape}, expected ({self.n_rows},); rewrite the file")
            if not self._alt_names:
                raise UserError(f"{p}: dataset alt has no attribute alt_names (the alternatives' names); rewrite the file")
        elif self._alt_names is not None:
            raise UserError(f"{p}: attribute alt_names without the dataset alt; rewrite the file")
        if self._has_panel and f["panel"].shape != (self.n_sets,):
            raise UserError(f"{p}: dataset panel has shape {f['panel'].shape}, expected ({self.n_sets},); rewrite the file")
        cluster = self._check_contiguous("cluster") if self.has_cluster else None
        panel = self._check_contiguous("panel", "panel unit") if self._has_panel else None
        if cluster is not None and panel is not None:
            # units nest in clusters: a decision maker's sets all lie in one cluster
            starts = np.flatnonzero(np.r_[True, panel[1:] != panel[:-1]])
            stops = np.r_[starts[1:], len(panel)] - 1
            split = np.flatnonzero(cluster[starts] != cluster[stops])
            if split.size:
                i = int(starts[split[0]])
                raise UserError(
                    f"{self.path}: panel unit {panel[i]} (sets {i}..{int(stops[split[0]])}) spans clusters "
                    f"{cluster[i]} and {cluster[stops[split[0]]]}; panel units must nest in clusters, rewrite the file")
        self.panel = panel  # (n_sets,) int64 or None: kept, 8 bytes per set like the offsets

    def _check_contiguous(self, name: str, what: str | None = None) -> np.ndarray:
        """The ids of dataset `name` (cluster or panel), (n_sets,) int64, checked: every id's sets
        form one block (the estimators split the data at unit boundaries). The ids cost 8 bytes
        per set, like the offsets."""
        what = what or name
        try:
            ids = self._f[name][...].astype(np.int64)
        except OSError as exc:
            raise UserError(f"{self.path}: dataset {name} cannot be read ({exc}); the file is truncated or damaged") from None
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if ids.size else ids
        if len(starts) != len(np.unique(ids)):
            run_ids = ids[starts]
            order = np.argsort(run_ids, kind="stable")
            dup = np.flatnonzero(run_ids[order][1:] == run_ids[order][:-1])[0]
            first, second = starts[order[dup]], starts[order[dup + 1]]
            raise UserError(
                f"{self.path}: {what} {ids[first]} is split into non-contiguous blocks (its sets start at "
                f"set {first} and again at set {second}); every {what}'s sets must be contiguous, rewrite the file"
            )
        return ids

    # -- reading ------------------------------------------------------------------------------
    def read_sets(self, start: int = 0, stop: int | None = None, empty=np.empty, with_dm: bool = True) -> ChoiceData:
        """Sets start:stop with their rows (offsets rebased to 0); reads only those rows.
        with_dm=False leaves dm out ((rows, 0): a likelihood reads no moments).

        empty(shape, dtype): allocates X and dm (estpipe.execution.tasks passes one whose pages
        are populated in one system call, much faster than faulting them in during the read)."""
        stop = self.n_sets if stop is None else stop
        if not 0 <= start <= stop <= self.n_sets:
            raise ValueError(f"set range {start}:{stop} outside 0:{self.n_sets}")
        r0, r1 = int(self.offsets[start]), int(self.offsets[stop])
        f = self._f
        try:
            X = empty((r1 - r0, self.K), dtype=np.float64)
            dm = empty((r1 - r0, self.M if with_dm else 0), dtype=np.float64)
            if r1 > r0:
                f["X"].read_direct(X, np.s_[r0:r1], np.s_[:])
                if with_dm:
                    f["dm"].read_direct(dm, np.s_[r0:r1], np.s_[:])
            chosen = f["chosen"][r0:r1].astype(np.int8) if self.has_chosen else None
            cluster = f["cluster"][start:stop].astype(np.int64) if self.has_cluster else None
            alt = f["alt"][r0:r1].astype(np.int32) if self.has_alt else None
        except OSError as exc:
            raise UserError(
                f"{self.path}: rows {r0}:{r1} cannot be read ({exc}); the file is truncated or damaged, rewrite it"
            ) from None
        panel = self.panel[start:stop].copy() if self.panel is not None else None
        return ChoiceData(X=X, dm=dm, offsets=self.offsets[start : stop + 1] - r0, chosen=chosen, cluster=cluster,
                          alt=alt, panel=panel, first_set=start)

    @property
    def x_names(self) -> list[str]:
        """The columns of X (the file attribute param_names)."""
        return self.param_names

    @property
    def alt_names(self) -> list[str] | None:
        """The alternatives' names (attribute alt_names; code c of dataset alt is alt_names[c]),
        or None when the file has no alternative ids."""
        return list(self._alt_names) if self._alt_names is not None else None

    @property
    def has_panel(self) -> bool:
        """Whether the file stores each set's panel unit (decision maker): dataset panel."""
        return self._has_panel

    def read_panel(self) -> np.ndarray | None:
        """Panel unit per set (n_sets,) int64, each unit's sets contiguous, or None."""
        return None if self.panel is None else self.panel.copy()

    def read_alt(self) -> np.ndarray | None:
        """Alternative code per row (n_rows,) int32, or None (reads the whole dataset: 4 bytes per row)."""
        return self._f["alt"][...].astype(np.int32) if self.has_alt else None

    def read_cluster(self) -> np.ndarray | None:
        """Cluster id per set (n_sets,), or None when the file has none."""
        return self._f["cluster"][...].astype(np.int64) if self.has_cluster else None

    def fingerprint(self) -> str:
        """A short hash that changes when the data change: sizes, names, offsets, provenance, and
        the first and last row chunks of X and dm (reading all of a large file would cost seconds)."""
        h = hashlib.sha256()
        h.update(json.dumps([self.n_sets, self.n_rows, self.K, self.M, self.param_names, self.moment_names]).encode())
        h.update(json.dumps(self.provenance, sort_keys=True).encode())
        h.update(self.offsets.tobytes())
        if self._has_panel:  # the units change S and the standard errors
            h.update(b"panel" + self.panel.tobytes())
        if self.has_alt:  # the alternatives change a nested logit
            h.update(b"alt" + json.dumps(self._alt_names).encode() + np.ascontiguousarray(self._f["alt"][:4096]).tobytes())
        n = min(self.n_rows, 4096)
        for name in ("X", "dm"):
            ds = self._f[name]
            h.update(np.ascontiguousarray(ds[:n]).tobytes())
            h.update(np.ascontiguousarray(ds[self.n_rows - n :]).tobytes())
        return h.hexdigest()[:16]

    def describe(self) -> dict:
        """Sizes, set-size distribution, names and provenance, as plain data (for inspect)."""
        sizes = np.diff(self.offsets)
        return {
            "path": str(self.path),
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "n_sets": self.n_sets,
            "n_rows": self.n_rows,
            "n_params": self.K,
            "n_moments": self.M,
            "param_names": self.param_names,
            "moment_names": self.moment_names,
            "set_sizes": {
                "min": int(sizes.min()) if sizes.size else 0,
                "median": float(np.median(sizes)) if sizes.size else 0.0,
                "mean": float(sizes.mean()) if sizes.size else 0.0,
                "max": int(sizes.max()) if sizes.size else 0,
                "counts": {str(int(k)): int(v) for k, v in zip(*np.unique(sizes, return_counts=True))},
            },
            "has_chosen": self.has_chosen,
            "has_cluster": self.has_cluster,
            "n_clusters": int(len(np.unique(self.read_cluster()))) if self.has_cluster else None,
            "alt_names": self.alt_names,
            "n_alternatives": len(self._alt_names) if self._alt_names is not None else None,
            "panel": self._describe_panel(),
            "nests": self.nests,
            "truth": self.truth.tolist() if self.truth is not None else None,
            "truth_names": self.truth_names,
            "provenance": self.provenance,
            "fingerprint": self.fingerprint(),
        }

    def _describe_panel(self) -> dict | None:
        """Panel units: their count and the distribution of sets per unit, or None."""
        if self.panel is None:
            return None
        ids = self.panel
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if ids.size else ids
        per_unit = np.diff(np.r_[starts, len(ids)])
        return {
            "n_units": int(len(starts)),
            "sets_per_unit": {
                "min": int(per_unit.min()) if per_unit.size else 0,
                "mean": float(per_unit.mean()) if per_unit.size else 0.0,
                "max": int(per_unit.max()) if per_unit.size else 0,
            },
        }

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "ChoiceDataFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _strings(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def first_split_unit(ids: np.ndarray) -> tuple[int, int] | None:
    """ids: (n,) a unit id per set. Where a unit's sets are not contiguous: (first, again), the
    set that starts its first block and the set that starts a later block; or None."""
    ids = np.asarray(ids)
    if ids.size == 0:
        return None
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    _, first_run, inverse = np.unique(ids[starts], return_index=True, return_inverse=True)
    again = np.flatnonzero(first_run[inverse] != np.arange(len(starts)))
    if again.size == 0:
        return None
    j = int(again[0])  # the earliest block of a unit seen before
    return int(starts[first_run[inverse[j]]]), int(starts[j])


def read_choice_data(path: str | os.PathLike, start: int = 0, stop: int | None = None) -> ChoiceData:
    """Sets start:stop of a file, in memory."""
    with ChoiceDataFile(path) as f:
        return f.read_sets(start, stop)


@dataclass
class ChoiceDataWriter:
    """Streams choice data into a new file. Use as a context manager:

        with ChoiceDataWriter(path, param_names, moment_names, provenance=...) as w:
            w.append(X, dm, set_sizes, chosen=..., cluster=..., alt=..., panel=...)

    alt_names: the alternatives' names when the file records each row's alternative code (alt,
    int32 0 .. len(alt_names) - 1); with_panel: the file records each set's panel unit (panel,
    int64; each unit's sets contiguous and, with clusters, in one cluster: checked on close);
    truth, truth_names: the true parameters of a simulation in the model's parameter order and
    their names (default: param_names); nests: the nests text of a nested-logit simulation.

    Rows, offsets and cluster ids go to a temporary file in the target folder as they come, so
    memory does not grow with the data; on a clean exit the attributes are written and the file
    is renamed to `path`; on an exception the temporary file is removed. The temporary file is
    registered with estpipe.interrupts while it exists, so a signal removes it too. A write that
    fails (a full disk, a quota) raises UserError naming the file and the device.
    """

    path: str | os.PathLike
    param_names: list[str]
    moment_names: list[str]
    provenance: dict = field(default_factory=dict)
    with_chosen: bool = False
    with_cluster: bool = False
    truth: np.ndarray | None = None
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    alt_names: list[str] | None = None
    with_panel: bool = False
    truth_names: list[str] | None = None
    nests: str | None = None

    def __post_init__(self):
        self.path = Path(self.path)
        folder = self.path.parent if str(self.path.parent) else Path(".")
        if not folder.is_dir():
            raise UserError(f"{self.path}: folder {folder} does not exist; create it or choose another output path")
        if self.path.is_dir():
            raise UserError(f"{self.path}: is a folder; give a file name for the output, e.g. {self.path / 'data.h5'}")
        self.K, self.M = len(self.param_names), len(self.moment_names)
        for what, n in (("parameters (K)", self.K), ("moments (M)", self.M)):
            if n > MAX_COLUMNS:
                raise UserError(f"{self.path}: {n:,} {what}, but a choice-data file holds at most {MAX_COLUMNS:,} "
                                "(their names are one HDF5 attribute, limited to 64 KiB); use fewer columns")
        self._folder = folder
        self.n_rows = 0
        self.n_sets = 0
        self._f = None
        self._tmp = None
        self._cleanup = None

    def __enter__(self) -> "ChoiceDataWriter":
        h5py = _h5py()
        try:
            with interrupts.deferred():
                fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self._folder)
                self._cleanup = interrupts.register(interrupts.remove_file(tmp), tmp)
            os.close(fd)
        except OSError as exc:
            raise outputs.write_error(self.path, exc) from None
        self._tmp = Path(tmp)
        try:
            # mkstemp makes the file private (0600); the finished file gets the usual permissions.
            os.chmod(self._tmp, outputs.file_mode())
            self._f = h5py.File(self._tmp, "w")
            # HDF5 chunks must stay below 4 GiB, and each is one read/write buffer: rows per chunk
            # shrink for very wide X or dm.
            c = max(1, min(self.chunk_rows, MAX_CHUNK_BYTES // (8 * max(self.K, self.M, 1))))
            self._X = self._f.create_dataset("X", (0, self.K), maxshape=(None, self.K), dtype="f8", chunks=(c, self.K))
            self._dm = self._f.create_dataset("dm", (0, self.M), maxshape=(None, self.M), dtype="f8", chunks=(c, self.M))
            if self.with_chosen:
                self._chosen = self._f.create_dataset("chosen", (0,), maxshape=(None,), dtype="i1", chunks=(c,))
            self._offsets = self._f.create_dataset("offsets", (1,), maxshape=(None,), dtype="i8", chunks=(c,))
            self._offsets[0] = 0
            if self.with_cluster:
                self._cluster = self._f.create_dataset("cluster", (0,), maxshape=(None,), dtype="i8", chunks=(c,))
            if self.alt_names is not None:
                self._alt = self._f.create_dataset("alt", (0,), maxshape=(None,), dtype="i4", chunks=(c,))
            if self.with_panel:
                self._panel = self._f.create_dataset("panel", (0,), maxshape=(None,), dtype="i8", chunks=(c,))
        except (OSError, RuntimeError) as exc:
            self._discard()
            raise outputs.write_error(self.path, exc) from None
        except BaseException:
            self._discard()
            raise
        return self

    def append(self, X, dm, set_sizes, chosen=None, cluster=None, alt=None, panel=None) -> None:
        """Append whole sets: X (rows, K), dm (rows, M), set_sizes (sets,) summing to rows, each
        at least 1; chosen (rows,), cluster (sets,), alt (rows,) and panel (sets,) when the file
        has them."""
        set_sizes = np.asarray(set_sizes, dtype=np.int64)
        rows = int(set_sizes.sum())
        if X.shape != (rows, self.K) or dm.shape != (rows, self.M):
            raise ValueError(f"append: X {X.shape} and dm {dm.shape} do not match {rows} rows, K={self.K}, M={self.M}")
        if set_sizes.size and set_sizes.min() < 1:
            raise ValueError("append: every set needs at least one row")
        if self.with_chosen and (chosen is None or len(chosen) != rows):
            raise ValueError("append: this file records chosen rows, pass one chosen flag per row")
        if self.with_cluster and (cluster is None or len(cluster) != len(set_sizes)):
            raise ValueError("append: this file records clusters, pass one id per set")
        if (self.alt_names is not None) != (alt is not None) or (alt is not None and len(alt) != rows):
            raise ValueError("append: pass one alternative code per row exactly when the file records alt_names")
        if self.with_panel != (panel is not None) or (panel is not None and len(panel) != len(set_sizes)):
            raise ValueError("append: pass one panel unit per set exactly when the file records panel units")
        r0, r1 = self.n_rows, self.n_rows + rows
        s0, s1 = self.n_sets, self.n_sets + len(set_sizes)
        try:
            self._X.resize(r1, axis=0)
            self._X[r0:r1] = X
            self._dm.resize(r1, axis=0)
            self._dm[r0:r1] = dm
            if self.with_chosen:
                self._chosen.resize(r1, axis=0)
                self._chosen[r0:r1] = chosen
            if alt is not None:
                self._alt.resize(r1, axis=0)
                self._alt[r0:r1] = np.asarray(alt, dtype=np.int32)
            if s1 > s0:
                self._offsets.resize(s1 + 1, axis=0)
                self._offsets[s0 + 1 : s1 + 1] = r0 + np.cumsum(set_sizes)
                if self.with_cluster:
                    self._cluster.resize(s1, axis=0)
                    self._cluster[s0:s1] = np.asarray(cluster, dtype=np.int64)
                if panel is not None:
                    self._panel.resize(s1, axis=0)
                    self._panel[s0:s1] = np.asarray(panel, dtype=np.int64)
        except (OSError, RuntimeError) as exc:  # h5py's errors: a full disk, a quota, an I/O error
            raise outputs.write_error(self.path, exc) from None
        self.n_rows, self.n_sets = r1, s1

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._discard()
            return
        try:
            self._finish()
            # Everything reaches the disk here, so that the close below has nothing left to write
            # (a close that fails leaves h5py unable to close the file, see _discard).
            self._f.flush()
        except (OSError, RuntimeError) as err:
            self._discard()
            raise outputs.write_error(self.path, err) from None
        except BaseException:
            self._discard()
            raise
        try:
            self._f.close()
            self._f = None
            os.replace(self._tmp, self.path)
        except OSError as err:
            self._discard()
            raise outputs.write_error(self.path, err) from None
        interrupts.unregister(self._cleanup)

    def _discard(self) -> None:
        """Close and remove the temporary file of a failed or interrupted write.

        The file is given up, so its disk space is released first and HDF5's last flush goes to
        an anonymous memory file instead: on a full disk that flush would fail, and an h5py file
        whose close failed cannot be closed again: HDF5 crashes (segfault) at interpreter exit
        when it tries."""
        if self._f is not None:
            try:
                fd = self._f.id.get_vfd_handle()
                os.ftruncate(fd, 0)
                blank = os.memfd_create("estpipe-discarded")
                os.dup2(blank, fd)
                os.close(blank)
            except (OSError, AttributeError, ValueError, TypeError):
                pass
            try:
                self._f.close()
            except Exception:  # noqa: BLE001 - the file is being given up; the first error is the one to report
                pass
            self._f = None
        if self._tmp is not None:
            try:
                self._tmp.unlink()
            except FileNotFoundError:
                pass
        interrupts.unregister(self._cleanup)

    def _finish(self) -> None:
        f = self._f
        if self.with_panel:
            ids = self._panel[...]
            split = first_split_unit(ids)
            if split is not None:
                raise ValueError(f"panel unit {ids[split[0]]} is not contiguous (sets {split[0]} and {split[1]})")
            if self.with_cluster and ids.size:
                cluster = self._cluster[...]
                starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
                if np.any(cluster[starts] != cluster[np.r_[starts[1:], len(ids)] - 1]):
                    raise ValueError("a panel unit lies in more than one cluster")
        if self.truth is not None:
            truth = np.asarray(self.truth, dtype=np.float64)
            names = list(self.truth_names) if self.truth_names is not None else list(self.param_names)
            if truth.shape != (len(names),):
                raise ValueError(f"truth {truth.shape} does not match its {len(names)} names")
            f.create_dataset("truth/params", data=truth)
            if self.truth_names is not None:
                f.attrs["truth_names"] = names
        if self.alt_names is not None:
            f.attrs["alt_names"] = [str(a) for a in self.alt_names]
        if self.nests is not None:
            f.attrs["nests"] = str(self.nests)
        f.attrs["estpipe_format"] = FORMAT_NAME
        f.attrs["estpipe_format_version"] = FORMAT_VERSION
        f.attrs["n_sets"] = self.n_sets
        f.attrs["n_rows"] = self.n_rows
        f.attrs["n_params"] = self.K
        f.attrs["n_moments"] = self.M
        f.attrs["param_names"] = list(self.param_names)
        f.attrs["moment_names"] = list(self.moment_names)
        f.attrs["provenance"] = json.dumps(self.provenance)


_current_umask = outputs.current_umask


def estimated_file_bytes(n_rows: int, n_sets: int, K: int, M: int, with_chosen: bool, with_cluster: bool,
                         with_alt: bool = False, with_panel: bool = False) -> int:
    """Bytes a ChoiceDataWriter file of these sizes takes on disk, a little more rather than less:
    X and dm float64, chosen int8, alt int32, offsets, cluster and panel ids int64, the last HDF5
    chunk of each dataset allocated whole, and 1 MiB for the metadata."""
    per_row = 8 * (K + M) + (1 if with_chosen else 0) + (4 if with_alt else 0)
    last_chunks = DEFAULT_CHUNK_ROWS * (per_row + 24)
    per_set = 8 + (8 if with_cluster else 0) + (8 if with_panel else 0)
    return n_rows * per_row + 8 + n_sets * per_set + last_chunks + 2**20


def write_choice_data(path, data: ChoiceData, param_names, moment_names, provenance=None, truth=None,
                      alt_names=None, truth_names=None, nests=None) -> None:
    """Write an in-memory ChoiceData in one go (tests and small files); alt_names is needed when
    data.alt is given."""
    if (data.alt is None) != (alt_names is None):
        raise ValueError("write_choice_data: give alt_names exactly when data.alt is given")
    with ChoiceDataWriter(
        path,
        list(param_names),
        list(moment_names),
        provenance=provenance or {},
        with_chosen=data.chosen is not None,
        with_cluster=data.cluster is not None,
        truth=truth,
        alt_names=None if alt_names is None else list(alt_names),
        with_panel=data.panel is not None,
        truth_names=None if truth_names is None else list(truth_names),
        nests=nests,
    ) as w:
        w.append(data.X, data.dm, np.diff(data.offsets), chosen=data.chosen, cluster=data.cluster,
                 alt=data.alt, panel=data.panel)
