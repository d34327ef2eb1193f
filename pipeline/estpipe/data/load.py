"""`estpipe load`: long-format CSV or Parquet (one row per available alternative) to a choice-data file.

The input is read twice, in batches, with only the needed columns:

1. the structure pass reads the set column (and the cluster and alternative columns, if any). It
   finds where each set starts, checks that every set's rows and every cluster's sets are
   contiguous, and collects the alternative levels for the constants. What it keeps is O(n_sets):
   the set start rows, the set ids (a compact Arrow array) and one cluster code per set.
2. the values pass reads the numeric columns, checks them, builds X and dm one batch of whole sets
   at a time (a partial set at the end of a batch is carried into the next) and streams them
   through `ChoiceDataWriter`, so memory does not grow with the file.

Bad input raises `UserError` naming the file, the line (CSV: the 1-based line number, the header
being line 1) or row (Parquet: the 0-based row index), the set id, what is wrong and how to fix
it. The writer works on a temporary file, so an error leaves no output.

A set with a single alternative carries no information (s = 1, ds/db = 0 and dm = 0): its rows are
checked like any other, then the set is dropped; `LoadSummary` and the provenance record how many.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from estpipe import outputs
from estpipe.data.format import MAX_ABS_VALUE, ChoiceDataWriter, estimated_file_bytes, provenance
from estpipe.errors import UserError, term
from estpipe.text import count

DEFAULT_BATCH_ROWS = 65_536
MAX_ALT_LEVELS = 200  # levels of the alternative column for constants (--asc)
MAX_ALT_IDS = 4000  # ... for alternative ids alone (their names are one HDF5 attribute)
CSV_BLOCK_MAX = 1 << 20
CSV_SUFFIXES = (".csv", ".csv.gz", ".csv.bz2")
PARQUET_SUFFIXES = (".parquet", ".pq")


@dataclass
class LoadSummary:
    """What `load_choice_data` wrote and what it dropped."""

    output: str
    input: str
    n_sets: int
    n_rows: int
    K: int
    M: int
    param_names: list[str]
    moment_names: list[str]
    rows_read: int
    n_batches: int
    seconds: float
    n_dropped_single_sets: int = 0
    first_dropped_set_id: str | None = None
    n_clusters: int | None = None
    asc_levels: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # for stderr: what the user may want to change
    alt_names: list[str] | None = None  # the alternatives (alt ids stored) or None
    n_units: int | None = None  # panel units (decision makers) or None

    @property
    def rows_per_second(self) -> float:
        return self.rows_read / self.seconds if self.seconds > 0 else math.inf


# -- the input table ---------------------------------------------------------------------------


class _Table:
    """A CSV or Parquet file read in batches of at most `batch_rows` rows, projected to the asked
    columns. CSV columns are read as text and converted here, so that a bad value can be pinned to
    its line; Parquet columns keep their types."""

    noun = "file"  # what a message tells the user to fix ("sort the file by ...")

    def __init__(self, path: Path, batch_rows: int):
        self.path = path
        self.batch_rows = max(1, int(batch_rows))
        name = path.name.lower()
        if name.endswith(CSV_SUFFIXES):
            self.kind = "csv"
        elif name.endswith(PARQUET_SUFFIXES):
            self.kind = "parquet"
        else:
            raise UserError(
                f"{path}: unsupported file type; estpipe load reads long-format CSV "
                f"({', '.join(CSV_SUFFIXES)}) or Parquet ({', '.join(PARQUET_SUFFIXES)}): rename or convert the file"
            )
        self.delimiter = self._delimiter() if self.kind == "csv" else ","
        self.names = self._column_names()
        self._check_unique_names()
        self.n_batches = 0

    def _delimiter(self) -> str:
        """',' unless the header line has no comma but semicolons or tabs (a ;-separated export of
        a spreadsheet in a decimal-comma locale, or a TSV named .csv): then that one."""
        try:
            with pa.input_stream(str(self.path), compression="detect") as f:
                header = f.read(1 << 16).split(b"\n", 1)[0]
        except (pa.ArrowInvalid, OSError):
            return ","  # reported by the reader, with its reason
        if b"," in header:
            return ","
        counts = {";": header.count(b";"), "\t": header.count(b"\t")}
        best = max(counts, key=counts.get)
        return best if counts[best] else ","

    @property
    def delimiter_name(self) -> str:
        return {",": "comma", ";": "semicolon", "\t": "tab"}[self.delimiter]

    def _check_unique_names(self) -> None:
        positions: dict[str, list[int]] = {}
        for i, name in enumerate(self.names, start=1):
            positions.setdefault(name, []).append(i)
        for name, where in positions.items():
            if len(where) > 1:
                raise UserError(
                    f"{self.path}: the header names column {name!r} {len(where)} times (columns "
                    f"{', '.join(map(str, where))}, counting from 1); rename them so that every column name is unique"
                )

    def _parse_options(self):
        import pyarrow.csv as pacsv

        return pacsv.ParseOptions(delimiter=self.delimiter)

    def where(self, row: int) -> str:
        """A row's place in the file, for messages: `row` is the 0-based data row."""
        return f"line {row + 2}" if self.kind == "csv" else f"row {row} (0-based)"

    def _column_names(self) -> list[str]:
        try:
            if self.kind == "csv":
                import pyarrow.csv as pacsv

                return list(pacsv.open_csv(self.path, read_options=pacsv.ReadOptions(block_size=1 << 16),
                                           parse_options=self._parse_options()).schema.names)
            import pyarrow.parquet as pq

            return list(pq.ParquetFile(self.path).schema_arrow.names)
        except (pa.ArrowInvalid, OSError) as exc:
            if "Empty CSV file" in str(exc):
                raise UserError(f"{self.path}: the file is empty; it needs a header line and one row per alternative") from None
            raise UserError(f"{self.path}: cannot be read as {self.kind.upper()}: {_one_line(exc)}") from None

    def _csv_block_bytes(self) -> int:
        """CSV read block (bytes): about `batch_rows` rows, estimated from the first MiB, at most
        CSV_BLOCK_MAX, and comfortably larger than the longest line seen (a line must fit in one
        block). Arrow's CSV reader holds a few dozen blocks at its peak whatever the file size (it
        reached 35 times the block measured on 1 to 4 million rows), so the block, not the file,
        sets the memory."""
        with pa.input_stream(str(self.path), compression="detect") as f:
            head = f.read(1 << 20)
        lines = head.split(b"\n")[1:-1] or head.split(b"\n")[:1]
        mean = sum(len(s) + 1 for s in lines) / max(1, len(lines))
        longest = max(len(s) + 1 for s in lines)
        return int(max(min(self.batch_rows * mean, CSV_BLOCK_MAX), 8 * longest, 1024))

    def batches(self, columns: list[str]):
        """Yield (row0, RecordBatch) with the given columns; row0 is the 0-based first data row."""
        try:
            if self.kind == "csv":
                import pyarrow.csv as pacsv

                reader = pacsv.open_csv(
                    self.path,
                    read_options=pacsv.ReadOptions(block_size=self._csv_block_bytes()),
                    parse_options=self._parse_options(),
                    convert_options=pacsv.ConvertOptions(
                        include_columns=columns,
                        column_types={c: pa.string() for c in columns},
                        null_values=[""],
                        strings_can_be_null=True,
                    ),
                )
            else:
                import pyarrow.parquet as pq

                reader = pq.ParquetFile(self.path).iter_batches(batch_size=self.batch_rows, columns=columns)
            row0 = 0
            for block in reader:
                for start in range(0, block.num_rows, self.batch_rows):
                    batch = block.slice(start, self.batch_rows)
                    self.n_batches += 1
                    yield row0, batch
                    row0 += batch.num_rows
        except (pa.ArrowInvalid, OSError) as exc:
            raise UserError(f"{self.path}: cannot be read as {self.kind.upper()}: {_one_line(exc)}; fix the file") from None


class FrameTable(_Table):
    """A pandas DataFrame's columns as an Arrow table, read like a Parquet file (typed columns);
    rows are named by position and index label (notebook.from_frame)."""

    def __init__(self, table: pa.Table, index, batch_rows: int, names: list[str] | None = None):
        # `table` holds the columns the load uses; `names` are all the frame's columns, which a
        # missing column's message lists (converting only the used ones keeps an unused column of
        # any type, e.g. complex or nested objects, out of the way, and is faster on wide frames).
        self.table, self.index = table, index
        self.path = "DataFrame"
        self.batch_rows = max(1, int(batch_rows))
        self.kind = "dataframe"
        self.noun = "frame"
        self.delimiter = ","
        self.names = list(names) if names is not None else list(table.schema.names)
        self.n_batches = 0

    def __str__(self) -> str:
        return "DataFrame"

    def where(self, row: int) -> str:
        label = self.index[row] if row < len(self.index) else None
        label = label.item() if hasattr(label, "item") else label  # a numpy scalar as a plain number
        return f"row {row} (index {label!r})"

    def batches(self, columns: list[str]):
        table = self.table.select(columns)
        for row0 in range(0, table.num_rows, self.batch_rows):
            self.n_batches += 1
            yield row0, table.slice(row0, self.batch_rows).combine_chunks().to_batches()[0]


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _plain(arr: pa.Array) -> pa.Array:
    """Dictionary-encoded columns (pandas categoricals in Parquet) as their plain values."""
    return arr.dictionary_decode() if pa.types.is_dictionary(arr.type) else arr


def _text(value) -> str:
    return str(value)


# -- pass 1: structure -------------------------------------------------------------------------


@dataclass
class _Structure:
    """What the structure pass found. set_starts: (n_sets,) first row of each set; set_ids:
    (n_sets,) Arrow array; cluster_codes, panel_codes: (n_sets,) int64, clusters and panel units
    numbered from 0 in order of appearance, or None; levels: the sorted levels of the alternative
    column, or None."""

    n_rows: int
    set_starts: np.ndarray
    set_ids: pa.Array
    cluster_codes: np.ndarray | None
    levels: list | None
    panel_codes: np.ndarray | None = None

    def __post_init__(self):
        self.set_ends = np.append(self.set_starts[1:], self.n_rows)  # (n_sets,) one past each set's last row

    @property
    def n_sets(self) -> int:
        return len(self.set_starts)


def _run_starts(values: pa.Array, previous) -> np.ndarray:
    """Positions (int64) where a run of equal values starts; position 0 counts when the value
    differs from `previous`, the last value of the batch before (None at the start of the file)."""
    n = len(values)
    change = np.zeros(n, dtype=bool)
    if n > 1:
        change[1:] = pc.not_equal(values[1:], values[:-1]).to_numpy(zero_copy_only=False)
    change[0] = previous is None or values[0].as_py() != previous
    return np.flatnonzero(change)


def _kept(values: pa.Array, positions: np.ndarray) -> pa.Array:
    """values[positions] as a new array, so that the batch it came from can be freed."""
    return pc.take(values, pa.array(positions, type=pa.int64()))


def _first_repeat(ids: pa.Array) -> tuple[int, int] | None:
    """ids: (n_runs,) the id of each run of equal values. Returns (first, again): `again` is the
    earliest run whose id an earlier run already had, and `first` is that earlier run; or None."""
    if pc.count_distinct(ids).as_py() == len(ids):
        return None
    counts = pc.value_counts(ids)
    repeated = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    candidates = np.flatnonzero(pc.is_in(ids, value_set=repeated).to_numpy(zero_copy_only=False))
    seen: dict = {}
    for i in candidates:
        key = ids[int(i)].as_py()
        if key in seen:
            return seen[key], int(i)
        seen[key] = int(i)
    return None


def _check_missing(table: _Table, arr: pa.Array, row0: int, column: str, what: str) -> None:
    if arr.null_count:
        i = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
        raise UserError(
            f"{table.path}: {table.where(row0 + i)}: {what} (column {column}) is missing; every row needs one"
        )


def _sorted_levels(levels: set) -> list:
    """Numbers sort numerically (also numbers read as text from CSV), anything else lexically."""
    try:
        return sorted(levels, key=lambda v: (float(v), str(v)))
    except (TypeError, ValueError):
        return sorted(levels, key=str)


class _SetColumn:
    """A column that holds one value per set (the cluster, the panel unit), scanned batch by
    batch: it refuses a set whose rows disagree and keeps the first row and the value of each run
    of equal values (O(runs))."""

    def __init__(self, table: _Table, column: str, what: str):
        self.table, self.column, self.what = table, column, what
        self.last = None
        self.starts: list[np.ndarray] = []
        self.ids: list[pa.Array] = []

    def scan(self, batch, row0: int, ids: pa.Array, set_starts: np.ndarray, open_set_start: int) -> None:
        """batch's rows row0..; ids: its set ids; set_starts: positions in the batch where sets start;
        open_set_start: the first row of the set open at the end of the previous batch."""
        table = self.table
        values = _plain(batch.column(self.column))
        _check_missing(table, values, row0, self.column, f"the {self.what} id")
        starts = _run_starts(values, self.last)
        inside = np.setdiff1d(starts, set_starts, assume_unique=True)
        if inside.size:
            i = int(inside[0])
            earlier = set_starts[set_starts < i]
            set_start = int(earlier[-1]) + row0 if earlier.size else open_set_start
            before = values[i - 1].as_py() if i > 0 else self.last
            raise UserError(
                f"{table.path}: set {ids[i].as_py()} (from {table.where(set_start)}) has rows in different {self.what}s "
                f"({self.column} {before}, then {values[i].as_py()} at {table.where(row0 + i)}); every row of a "
                f"set must carry the same {self.what} id"
            )
        self.starts.append(starts + row0)
        self.ids.append(_kept(values, starts))
        self.last = values[-1].as_py()

    def runs(self) -> tuple[np.ndarray, pa.Array]:
        """(first row of each run (n_runs,), the value of each run)."""
        return np.concatenate(self.starts), pa.concat_arrays(self.ids)


def _scan_structure(table: _Table, set_col: str, cluster_col: str | None, alt_col: str | None,
                    panel_col: str | None = None, max_levels: int = MAX_ALT_LEVELS) -> _Structure:
    columns = [c for c in dict.fromkeys([set_col, cluster_col, panel_col, alt_col]) if c is not None]
    set_starts, set_ids = [], []
    clusters = _SetColumn(table, cluster_col, "cluster") if cluster_col is not None else None
    panel = _SetColumn(table, panel_col, "panel unit") if panel_col is not None else None
    levels: set = set()
    last_set = None
    open_set_start = 0  # first row of the set still open at the end of the previous batch
    n_rows = 0
    for row0, batch in table.batches(columns):
        if batch.num_rows == 0:
            continue
        ids = _plain(batch.column(set_col))
        _check_missing(table, ids, row0, set_col, "the set id")
        starts = _run_starts(ids, last_set)
        set_starts.append(starts + row0)
        set_ids.append(_kept(ids, starts))
        for column in (clusters, panel):
            if column is not None:
                column.scan(batch, row0, ids, starts, open_set_start)
        if alt_col is not None:
            alts = _plain(batch.column(alt_col))
            _check_missing(table, alts, row0, alt_col, "the alternative")
            levels.update(pc.unique(alts).to_pylist())
            if len(levels) > max_levels:
                use = "alternative-specific constants need" if max_levels == MAX_ALT_LEVELS else "alternative ids need"
                raise UserError(
                    f"{table.path}: column {alt_col} has more than {max_levels} levels; {use} a column naming the "
                    f"alternative (a few levels): check {term('alt_col')}"
                )
        last_set = ids[-1].as_py()
        if starts.size:
            open_set_start = int(starts[-1]) + row0
        n_rows = row0 + batch.num_rows
    if n_rows == 0:
        raise UserError(f"{table.path}: no data rows (only a header); the file needs one row per available alternative")

    starts = np.concatenate(set_starts)
    ids = pa.concat_arrays(set_ids)
    ends = np.append(starts[1:], n_rows)
    repeat = _first_repeat(ids)
    if repeat is not None:
        a, b = repeat
        raise UserError(
            f"{table.path}: the rows of set {ids[b].as_py()} are not contiguous: it occupies "
            f"{table.where(int(starts[a]))} to {table.where(int(ends[a]) - 1)} and appears again at "
            f"{table.where(int(starts[b]))}; sort the {table.noun} by {set_col} so that each set's rows are together"
        )

    def set_at(row: int):
        return ids[int(np.searchsorted(starts, row, side="right")) - 1].as_py()

    codes = None
    if clusters is not None:
        cstarts, cids = clusters.runs()
        repeat = _first_repeat(cids)
        if repeat is not None:
            a, b = repeat
            raise UserError(
                f"{table.path}: cluster {cids[b].as_py()} is split into non-contiguous blocks: its sets start at "
                f"{table.where(int(cstarts[a]))} and again at {table.where(int(cstarts[b]))} after other clusters; "
                f"sort the {table.noun} by {cluster_col} (then {set_col}) so that each cluster's sets are together"
            )
        codes = np.searchsorted(cstarts, starts, side="right").astype(np.int64) - 1
    panel_codes = None
    if panel is not None:
        pstarts, pids = panel.runs()
        repeat = _first_repeat(pids)
        if repeat is not None:
            a, b = repeat
            order = f"{cluster_col}, then {panel_col}, then {set_col}" if cluster_col else f"{panel_col} (then {set_col})"
            raise UserError(
                f"{table.path}: the sets of panel unit {pids[b].as_py()} (column {panel_col}) are not contiguous: they start "
                f"with set {set_at(int(pstarts[a]))} ({table.where(int(pstarts[a]))}) and the unit appears again at set "
                f"{set_at(int(pstarts[b]))} ({table.where(int(pstarts[b]))}) after other units; sort the {table.noun} by {order} "
                "so that each decision maker's sets are together"
            )
        if clusters is not None:
            # units nest in clusters: every cluster boundary is a unit boundary
            inside = np.setdiff1d(cstarts, pstarts, assume_unique=True)
            if inside.size:
                row = int(inside[0])
                u = int(np.searchsorted(pstarts, row, side="right")) - 1
                c = int(np.searchsorted(cstarts, row, side="right")) - 1
                raise UserError(
                    f"{table.path}: panel unit {pids[u].as_py()} (column {panel_col}) lies in two clusters: its sets are in "
                    f"{cluster_col} {cids[c - 1].as_py()} and, from set {set_at(row)} ({table.where(row)}), in "
                    f"{cluster_col} {cids[c].as_py()}; a decision maker must lie in one cluster: check {term('panel_col')} "
                    f"and {term('cluster_col')}"
                )
        panel_codes = np.searchsorted(pstarts, starts, side="right").astype(np.int64) - 1
    return _Structure(
        n_rows=n_rows,
        set_starts=starts,
        set_ids=ids,
        cluster_codes=codes,
        levels=_sorted_levels(levels) if alt_col is not None else None,
        panel_codes=panel_codes,
    )


# -- pass 2: values ----------------------------------------------------------------------------


def _float_column(table: _Table, arr: pa.Array, row0: int, column: str) -> np.ndarray:
    """A column of the batch as float64 (rows,), refusing non-numeric, missing, NaN and infinite
    values with the column and the row."""
    arr = _plain(arr)
    _check_missing(table, arr, row0, column, "the value")
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        try:
            arr = pc.cast(arr, pa.float64())
        except pa.ArrowInvalid:
            i = _first_unparsable(arr)
            text = arr[i].as_py()
            hint = " (a decimal comma? write numbers with a decimal point)" if _DECIMAL_COMMA.match(text) else ""
            raise UserError(
                f"{table.path}: {table.where(row0 + i)}: column {column} holds {text!r}, which is not a "
                f"number{hint}; every used column must be numeric"
            ) from None
    elif pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type) or pa.types.is_boolean(arr.type) or pa.types.is_decimal(arr.type):
        arr = pc.cast(arr, pa.float64())
    else:
        raise UserError(
            f"{table.path}: column {column} has type {arr.type}, not a number; every used column must be numeric"
        )
    values = arr.to_numpy(zero_copy_only=False)
    ok = np.abs(values) <= MAX_ABS_VALUE  # False for NaN too
    if not ok.all():
        i = int(np.argmin(ok))
        where = f"{table.path}: {table.where(row0 + i)}: column {column} holds"
        if np.isfinite(values[i]):
            raise UserError(
                f"{where} {values[i]:g}, beyond +-{MAX_ABS_VALUE:g} (its square overflows float64); rescale the "
                f"column (e.g. to thousands) and load again"
            )
        kind = "NaN" if np.isnan(values[i]) else "an infinite value"
        raise UserError(f"{where} {kind}; every used value must be a finite number")
    return values


_DECIMAL_COMMA = re.compile(r"^\s*[-+]?\d*,\d+\s*$")


def _first_unparsable(arr: pa.Array) -> int:
    """Index of the first text value that does not cast to float64 (bisection over slices)."""
    lo, hi = 0, len(arr)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            pc.cast(arr.slice(lo, mid - lo), pa.float64())
            lo = mid
        except pa.ArrowInvalid:
            hi = mid
    return lo


@dataclass
class _Spec:
    set_col: str
    choice_col: str
    x: list[str]
    z: list[str] | None
    dm: list[str] | None
    alt_col: str | None
    cluster_col: str | None

    @property
    def numeric_columns(self) -> list[str]:
        return list(dict.fromkeys([self.choice_col, *self.x, *(self.z or []), *(self.dm or [])]))

    @property
    def value_columns(self) -> list[str]:
        """The columns of the values pass: the numeric ones and the alternative column."""
        return list(dict.fromkeys(self.numeric_columns + ([self.alt_col] if self.alt_col is not None else [])))


class _XColumnFacts:
    """What the values pass learns about the x columns (not the constants `asc` adds), batch by
    batch of whole sets: whether each is the same in every row, the same within every set, or
    equal to another x column in every row. Such a column's parameter is not identified (estimate
    refuses the model); load writes the file and says so. Once a fact is settled for a column
    (it varies; a pair differs) it is not looked at again, so after the first batches this costs
    one comparison with the first row per value."""

    def __init__(self, names: list[str]):
        k = len(names)
        self.names = names
        self.first: np.ndarray | None = None  # (k,) the first row
        self.varies = np.zeros(k, dtype=bool)
        self.varies_within = np.zeros(k, dtype=bool)
        self.equal = np.triu(np.ones((k, k), dtype=bool), 1)  # equal[a, b], a < b: equal so far

    def update(self, X: np.ndarray, sizes: np.ndarray) -> None:
        """X: (rows, k) the x columns of whole sets of `sizes` (n_sets,) rows."""
        if X.shape[0] == 0:
            return
        if self.first is None:
            self.first = X[0].copy()
        open_ = np.flatnonzero(~self.varies)
        if open_.size:
            self.varies[open_] = (X[:, open_] != self.first[open_]).any(axis=0)
        open_ = np.flatnonzero(~self.varies_within)
        if open_.size:
            Xo = X[:, open_]
            starts = np.cumsum(sizes) - sizes
            self.varies_within[open_] = (Xo != np.repeat(Xo[starts], sizes, axis=0)).any(axis=0)
        for a, b in zip(*np.nonzero(self.equal)):
            self.equal[a, b] = np.array_equal(X[:, a], X[:, b])

    def notes(self) -> list[str]:
        out = []
        for j, name in enumerate(self.names):
            if self.first is not None and not self.varies[j]:
                out.append(f"column {name} ({term('x')}) is {self.first[j]:g} in every row, so it never varies within a set and "
                           f"its parameter is not identified; estimate refuses such a model: drop {name} from {term('x')}")
            elif not self.varies_within[j]:
                out.append(f"column {name} ({term('x')}) never varies within a set (it describes the set, not the "
                           f"alternative), so its parameter is not identified; estimate refuses such a model: drop {name} "
                           f"from {term('x')}, or enter it multiplied by an attribute of the alternatives")
        for b in range(len(self.names)):
            twins = [a for a in np.flatnonzero(self.equal[:, b]) if self.varies_within[a] and self.varies_within[b]]
            if twins:
                a = int(twins[0])
                out.append(f"columns {self.names[a]} and {self.names[b]} ({term('x')}) are equal in every row, so their "
                           f"parameters are not identified apart; estimate refuses such a model: drop one of them from {term('x')}")
        return out


class _SetBuilder:
    """Turns rows of whole sets into X (rows, K), dm (rows, M), chosen, set sizes, alternative
    codes and panel units, checks that each set has exactly one chosen row and (with alternative
    ids) no alternative twice, and drops sets with a single alternative."""

    def __init__(self, table: _Table, spec: _Spec, structure: _Structure, asc_levels: list | None, base):
        self.table, self.spec, self.structure = table, spec, structure
        self.asc_levels = asc_levels
        self.level_values = None
        if structure.levels is not None:
            # alternative codes: positions in the sorted levels of the alternative column
            self.level_values = pa.array(structure.levels)
        if asc_levels is not None:
            self.asc_index = np.array([i for i, v in enumerate(structure.levels) if v != base], dtype=np.int64)
        self.n_dropped = 0
        self.first_dropped: str | None = None
        self.x_facts = _XColumnFacts(spec.x)

    def codes(self, alts: pa.Array) -> np.ndarray:
        """alts: (rows,) alternative levels -> (rows,) int32 codes into structure.levels."""
        return pc.index_in(_plain(alts), value_set=self.level_values).to_numpy(zero_copy_only=False).astype(np.int32)

    def asc(self, codes: np.ndarray) -> np.ndarray:
        """codes: (rows,) alternative codes -> (rows, n_levels - 1) 0/1 constants."""
        return (codes[:, None] == self.asc_index[None, :]).astype(np.float64)

    def _check_distinct_alternatives(self, codes: np.ndarray, starts: np.ndarray, sizes: np.ndarray, set_lo: int, row_lo: int) -> None:
        """No set lists an alternative twice (codes (rows,) of sets starting at `starts`)."""
        n_levels = len(self.structure.levels)
        set_of_row = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
        key = set_of_row * n_levels + codes
        order = np.argsort(key, kind="stable")
        same = np.flatnonzero(key[order][1:] == key[order][:-1])
        if same.size:
            second = int(min(order[same + 1]))
            k = int(set_of_row[second])
            first = int(np.flatnonzero((set_of_row == k) & (codes == codes[second]))[0])
            raise UserError(
                f"{self.table.path}: set {self.structure.set_ids[set_lo + k].as_py()} lists alternative "
                f"{_text(self.structure.levels[codes[second]])} twice ({self.table.where(row_lo + first)} and "
                f"{self.table.where(row_lo + second)}); each alternative may appear once per set: check {term('alt_col')}"
            )

    def build(self, cols: dict[str, np.ndarray], set_lo: int, set_hi: int, row_lo: int):
        """cols: column -> (rows,) for the rows of sets set_lo:set_hi, which start at row_lo;
        cols["__alt__"]: their alternative codes or None. Returns X, dm, sizes, chosen, cluster,
        alt codes and panel units of the kept sets."""
        s = self.structure
        starts = s.set_starts[set_lo:set_hi] - row_lo
        sizes = np.diff(np.append(starts, s.set_ends[set_hi - 1] - row_lo))
        choice = cols[self.spec.choice_col]
        bad = (choice != 0) & (choice != 1)
        if bad.any():
            i = int(np.argmax(bad))
            raise UserError(
                f"{self.table.path}: {self.table.where(row_lo + i)}: column {self.spec.choice_col} is "
                f"{choice[i]:g}; the choice column must be 1 for the chosen alternative and 0 otherwise"
            )
        n_chosen = np.add.reduceat(choice, starts)
        wrong = np.flatnonzero(n_chosen != 1)
        if wrong.size:
            k = int(wrong[0])
            first, last = row_lo + int(starts[k]), row_lo + int(starts[k] + sizes[k]) - 1
            problem = "no chosen row" if n_chosen[k] == 0 else f"{int(n_chosen[k])} chosen rows"
            raise UserError(
                f"{self.table.path}: set {s.set_ids[set_lo + k].as_py()} ({self.table.where(first)} to "
                f"{self.table.where(last)}) has {problem}; exactly one row of each set must have {self.spec.choice_col} = 1"
            )
        alt = cols["__alt__"]
        if alt is not None:
            self._check_distinct_alternatives(alt, starts, sizes, set_lo, row_lo)
        asc = self.asc(alt) if self.asc_levels is not None else None
        X = np.column_stack([cols[c] for c in self.spec.x] + ([asc] if asc is not None else []))
        if self.spec.dm is not None:
            dm = np.column_stack([cols[c] for c in self.spec.dm])
        else:
            z_cols = [cols[c] for c in (self.spec.z or self.spec.x)]
            Z = np.column_stack(z_cols + ([asc] if asc is not None else []))
            chosen_rows = np.flatnonzero(choice == 1)
            dm = Z - np.repeat(Z[chosen_rows], sizes, axis=0)
        keep_sets = sizes > 1
        cluster = s.cluster_codes[set_lo:set_hi] if s.cluster_codes is not None else None
        panel = s.panel_codes[set_lo:set_hi] if s.panel_codes is not None else None
        if not keep_sets.all():
            dropped = np.flatnonzero(~keep_sets)
            if self.first_dropped is None:
                self.first_dropped = _text(s.set_ids[set_lo + int(dropped[0])].as_py())
            self.n_dropped += dropped.size
            keep_rows = np.repeat(keep_sets, sizes)
            X, dm, choice = X[keep_rows], dm[keep_rows], choice[keep_rows]
            sizes = sizes[keep_sets]
            cluster = cluster[keep_sets] if cluster is not None else None
            panel = panel[keep_sets] if panel is not None else None
            alt = alt[keep_rows] if alt is not None else None
        self.x_facts.update(X[:, : len(self.spec.x)], sizes)
        return X, dm, sizes, choice.astype(np.int8), cluster, alt, panel


def _columns_list(option: str, value) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        names = [c.strip() for c in value.split(",")]
    else:  # a list, tuple or pandas Index of names (the Python API)
        try:
            names = [str(c).strip() for c in value]
        except TypeError:
            names = None
        if names is None or isinstance(value, (bytes, dict)):
            raise UserError(f"{option} {value!r}: give the column names as a list or as text separated by commas, "
                            f"e.g. {option} price,time")
    if not names or any(not c for c in names):
        raise UserError(f"{option} {value!r}: give column names separated by commas, e.g. {option} price,time")
    dup = [c for c in dict.fromkeys(names) if names.count(c) > 1]
    if dup:
        raise UserError(f"{option}: column {dup[0]} is listed twice; list each column once")
    return names


def load_choice_data(
    input,
    out,
    *,
    set_col: str,
    choice_col: str,
    x,
    z=None,
    dm=None,
    alt_col: str | None = None,
    asc: bool = False,
    asc_base: str | None = None,
    cluster_col: str | None = None,
    panel_col: str | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    command: str = "estpipe load",
) -> LoadSummary:
    """Convert a long-format CSV or Parquet file (one row per available alternative) to a
    choice-data file at `out`.

    x: the covariate columns -> X (n_rows, K); z: instrument columns (default: x), dm = z - z of the
    chosen row of the set; or dm: moment columns taken as given. With `alt_col`, each row's
    alternative is stored as a code into the sorted levels of `alt_col` (numbers sorted
    numerically, text lexically; names in the attribute alt_names; a set may list an alternative
    once). With `asc` too, one 0/1 constant per level except `asc_base` (default: the first level)
    is appended to X as "asc_<level>" and to z (given or not: a constant is its own instrument). With `panel_col`, each set's
    panel unit (decision maker): one value per set, each unit's sets contiguous and, with
    `cluster_col`, inside one cluster; units are numbered from 0 in order of appearance.
    Column lists are lists or comma-separated strings. Sets with a single alternative are dropped.
    Raises UserError for bad input and leaves no file behind.
    """
    t0 = time.perf_counter()
    frame = input if isinstance(input, FrameTable) else None
    input, out = (frame if frame is not None else Path(input)), Path(out)
    x_cols = _columns_list(term("x"), x)
    z_cols = _columns_list(term("z"), z)
    dm_cols = _columns_list(term("dm"), dm)
    if not x_cols:
        raise UserError(f"{term('x')}: give the covariate columns, e.g. {term('x')} price,time")
    if z_cols is not None and dm_cols is not None:
        raise UserError(f"{term('z')} and {term('dm')} together: give instruments with {term('z')} (dm = z - z of the chosen row) "
                        f"or ready moment columns with {term('dm')}, not both")
    if asc and alt_col is None:
        raise UserError(f"{term('asc')} needs {term('alt_col')}: name the column that says which alternative a row is")
    if asc_base is not None and not asc:
        raise UserError(f"{term('asc_base')} needs {term('asc')} (and {term('alt_col')})")
    if frame is None and not input.exists():
        raise UserError(f"{input}: no such file; check the path of the input CSV or Parquet file")
    if frame is None and input.is_dir():
        raise UserError(f"{input}: is a folder; give a CSV or Parquet file")
    if out.is_dir():
        raise UserError(f"{out}: is a folder; give the path of the choice-data file to write, e.g. {out / 'data.h5'}")
    if frame is None and out.resolve() == input.resolve():
        raise UserError(f"{out}: the output would overwrite the input; choose another output path")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise UserError(f"{out}: folder {folder} does not exist; create it or choose another output path")
    outputs.check_writable(out, "")

    table = frame if frame is not None else _Table(input, batch_rows)
    spec = _Spec(set_col, choice_col, x_cols, z_cols, dm_cols, alt_col, cluster_col)
    asked = {"set_col": [set_col], "choice_col": [choice_col], "x": x_cols, "z": z_cols or [], "dm": dm_cols or [],
             "alt_col": [alt_col] if alt_col else [], "cluster_col": [cluster_col] if cluster_col else [],
             "panel_col": [panel_col] if panel_col else []}
    for argument, names in asked.items():
        for name in names:
            if name not in table.names:
                raise UserError(
                    f"{input}: no column {name!r} (asked by {term(argument)}); the columns are: {', '.join(table.names)}"
                )

    for argument, name in (("set_col", set_col), ("cluster_col", cluster_col), ("alt_col", alt_col)):
        if panel_col is not None and name == panel_col:
            raise UserError(f"{term('panel_col')} {panel_col} is also {term(argument)}; the decision maker's id is a column of its own")
    structure = _scan_structure(table, set_col, cluster_col, spec.alt_col, panel_col,
                                max_levels=MAX_ALT_LEVELS if asc else MAX_ALT_IDS)
    asc_levels, base = None, None
    if asc:
        levels = structure.levels
        if asc_base is None:
            base = levels[0]
        else:
            matches = [v for v in levels if _text(v) == asc_base or _same_number(v, asc_base)]
            if not matches:
                raise UserError(
                    f"{term('asc_base')} {asc_base}: not a level of column {alt_col}; its levels are: {', '.join(map(_text, levels))}"
                )
            base = matches[0]
        asc_levels = [v for v in levels if v != base]
    asc_names = [f"asc_{_text(v)}" for v in asc_levels or []]
    param_names = x_cols + asc_names
    moment_names = dm_cols if dm_cols is not None else (z_cols if z_cols is not None else x_cols) + asc_names
    K, M = len(param_names), len(moment_names)
    if M < K:
        source = term("dm") if dm_cols is not None else term("z")
        raise UserError(
            f"M = {count(M, 'moment column')} ({source} {','.join(moment_names)}) but K = {K} parameters "
            f"({','.join(param_names)}); GMM needs M >= K: add columns to {source} or use fewer in {term('x')}"
        )

    outputs.check_free_space(
        out, estimated_file_bytes(structure.n_rows, structure.n_sets, K, M, True, cluster_col is not None,
                                  alt_col is not None, panel_col is not None),
        "free some space there or write the output to another folder")
    builder = _SetBuilder(table, spec, structure, asc_levels, base)
    value_columns = spec.value_columns
    details = {
        "input": str(input),
        "input_format": table.kind,
        "input_delimiter": table.delimiter if table.kind == "csv" else None,
        "options": {
            "set_col": set_col, "choice_col": choice_col, "x": x_cols, "z": z_cols, "dm": dm_cols,
            "alt_col": alt_col, "asc": asc, "asc_base": asc_base, "cluster_col": cluster_col, "panel_col": panel_col,
        },
        "asc_levels": [_text(v) for v in structure.levels] if structure.levels is not None and asc else None,
        "asc_base_level": _text(base) if base is not None else None,
        "single_alternative_sets": "dropped (they carry no information)",
    }
    if cluster_col is not None:
        details["cluster_ids"] = "numbered from 0 in order of appearance in the input"
    if panel_col is not None:
        details["panel_ids"] = "numbered from 0 in order of appearance in the input"
    alt_names = [_text(v) for v in structure.levels] if structure.levels is not None else None
    if alt_names is not None and len(set(alt_names)) != len(alt_names):
        raise UserError(f"{input}: column {alt_col} has levels that read the same as text ({', '.join(alt_names)}); "
                        "give each alternative one spelling")
    table.n_batches = 0
    carry: dict[str, np.ndarray] | None = None
    carry_row = 0
    next_set = 0
    ends = structure.set_ends
    writer = ChoiceDataWriter(
        out, param_names, moment_names, provenance={}, with_chosen=True, with_cluster=cluster_col is not None,
        alt_names=alt_names, with_panel=panel_col is not None,
    )
    with writer:
        for row0, batch in table.batches(value_columns):
            cols = {c: _float_column(table, batch.column(c), row0, c) for c in spec.numeric_columns}
            cols["__alt__"] = builder.codes(batch.column(spec.alt_col)) if spec.alt_col is not None else None
            if carry is not None:
                cols = {c: (np.concatenate([carry[c], v]) if v is not None else None) for c, v in cols.items()}
                row_lo = carry_row
            else:
                row_lo = row0
            row_hi = row0 + batch.num_rows
            set_hi = int(np.searchsorted(ends, row_hi, side="right"))
            if set_hi > next_set:
                cut = int(ends[set_hi - 1]) - row_lo
                part = {c: (v[:cut] if v is not None else None) for c, v in cols.items()}
                X, dm_rows, sizes, chosen, cluster, alt, panel = builder.build(part, next_set, set_hi, row_lo)
                if sizes.size:
                    writer.append(X, dm_rows, sizes, chosen=chosen, cluster=cluster, alt=alt, panel=panel)
                next_set = set_hi
                cols = {c: (v[cut:] if v is not None else None) for c, v in cols.items()}
                row_lo += cut
            carry, carry_row = (cols, row_lo) if row_hi > row_lo else (None, row_hi)
        if next_set != structure.n_sets or carry is not None:
            raise UserError(f"{input}: the file changed while it was being loaded; load it again")
        if writer.n_rows == 0:
            raise UserError(
                f"{input}: every set has a single alternative ({count(builder.n_dropped, 'set')}), and such sets carry no "
                f"information; the {table.noun} needs sets with two or more alternatives"
            )
        details["dropped_single_alternative_sets"] = builder.n_dropped
        details["first_dropped_set_id"] = builder.first_dropped
        details["n_batches"] = table.n_batches
        writer.provenance = provenance(command, **details)
    notes = []
    if table.delimiter != ",":
        notes.append(f"{input}: the header is {table.delimiter_name}-separated, not comma-separated; read it as such")
    if builder.n_dropped:
        notes.append(f"dropped {count(builder.n_dropped, 'set')} with a single alternative (first: set {builder.first_dropped}); "
                     "they carry no information")
    notes += builder.x_facts.notes()
    n_kept = structure.n_sets - builder.n_dropped
    n_clusters = None
    if structure.cluster_codes is not None:
        n_clusters = int(len(np.unique(structure.cluster_codes[_kept_sets(structure)])))
    n_units = None
    if structure.panel_codes is not None:
        n_units = int(len(np.unique(structure.panel_codes[_kept_sets(structure)])))
    return LoadSummary(
        output=str(out),
        input=str(input),
        n_sets=n_kept,
        n_rows=writer.n_rows,
        K=K,
        M=M,
        param_names=param_names,
        moment_names=moment_names,
        rows_read=structure.n_rows,
        n_batches=table.n_batches,
        seconds=time.perf_counter() - t0,
        n_dropped_single_sets=builder.n_dropped,
        first_dropped_set_id=builder.first_dropped,
        n_clusters=n_clusters,
        asc_levels=[_text(v) for v in asc_levels or []],
        notes=notes,
        alt_names=alt_names,
        n_units=n_units,
    )


def _kept_sets(structure: _Structure) -> np.ndarray:
    return (structure.set_ends - structure.set_starts) > 1


def _same_number(level, text: str) -> bool:
    try:
        return float(level) == float(text)
    except (TypeError, ValueError):
        return False
