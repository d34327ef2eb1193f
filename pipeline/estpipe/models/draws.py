"""Draws for simulated models: standard normals per decision maker, made where they are used.

Every unit (a panel unit, or a set when the file has none) gets its own independent
randomization of one base sequence, a pure function of (seed, unit index): so draws are
independent across units, the estimate does not depend on partitions, workers, tiles or draw
batches, and no array of all draws ever exists (a tile asks for its units' draws r0:r1 and
forgets them).

- "sobol": a scrambled Sobol sequence (scipy.stats.qmc, Owen scrambling from the seed), and per
  unit a random digital shift (XOR of a per-unit random number into the first 16 binary digits of
  every coordinate), the standard randomization of digital nets;
- "halton": a scrambled Halton sequence, and per unit a random shift modulo 1 (Cranley-Patterson);
- "pseudo": pseudo-random uniforms, a hash of (seed, unit, draw, dimension).

A uniform u on the grid of 2^16 cells is turned into a normal by a table of the inverse normal
CDF at the cells' midpoints (built once; 512 kB, it stays in cache): a table lookup costs a few
nanoseconds where an inverse CDF costs 30. Both randomizations leave each point uniform on the
2^16 cells, so the draws are from the normal discretized to 65,536 equally likely values: its
moments differ from the normal's by O(4^-16) ~ 2e-10, far below the simulation error of any R.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
import types
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from estpipe.registry import Registry

BITS = 16
CELLS = 1 << BITS
_MASK = np.uint64(CELLS - 1)


@dataclass(frozen=True)
class DrawKind:
    name: str
    description: str


DRAW_KINDS: Registry[DrawKind] = Registry("draws kind", [
    DrawKind("sobol", "scrambled Sobol, a random digital shift per decision maker"),
    DrawKind("halton", "scrambled Halton, a random shift per decision maker"),
    DrawKind("pseudo", "pseudo-random, a hash of seed, decision maker and draw"),
], argument="draws_kind")


@lru_cache(maxsize=1)
def _inverse_normal_table() -> np.ndarray:
    from scipy.special import ndtri

    return ndtri((np.arange(CELLS, dtype=np.float64) + 0.5) / CELLS)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, elementwise on uint64 (a bijection with good avalanche)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _hash(seed: int, *keys: np.ndarray) -> np.ndarray:
    """A uint64 hash of (seed, keys...), broadcast over the keys."""
    with np.errstate(over="ignore"):
        h = _mix(np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(0x632BE59BD9B4E019))
        for k in keys:
            h = _mix(h ^ (np.asarray(k, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)))
    return h


_qmc_lock = threading.Lock()


@contextmanager
def _qmc():
    """scipy's quasi-Monte Carlo engines (scipy.stats.qmc's, from scipy.stats._qmc), for the
    length of the block.

    `from scipy.stats import qmc` runs scipy.stats' package __init__, which builds every
    distribution and its docstrings: 0.7 s of a 6 s mixed-logit command on this 2-core machine
    (cProfile and -X importtime, 2026-12-03), against 0.01 s for the engines' own modules. So,
    unless scipy.stats is imported already, the block runs with a bare package entry for
    scipy.stats (its real spec, so that Sobol's direction numbers load as package resources)
    that is removed at its end: the engines are scipy's own code, and a later `import
    scipy.stats` runs the real __init__, which finds _qmc loaded and uses it
    (tests/test_models.py checks that both give the same engines and points). If the block
    fails (a scipy whose _qmc needs its package's names), every module it added is dropped and
    the error raised: _base_cells then takes the plain import. Under a lock: tiles make draws on
    several threads."""
    with _qmc_lock:
        if "scipy.stats" in sys.modules:
            from scipy.stats import qmc
            yield qmc
            return
        import scipy

        before = set(sys.modules)
        bare = types.ModuleType("scipy.stats")
        done = False
        try:
            bare.__spec__ = importlib.util.find_spec("scipy.stats")
            bare.__path__ = list(bare.__spec__.submodule_search_locations)
            bare.__package__ = "scipy.stats"
            sys.modules["scipy.stats"] = bare
            from scipy.stats import _qmc as module
            yield module
            done = True
        finally:
            if sys.modules.get("scipy.stats") is bare:
                del sys.modules["scipy.stats"]
            if vars(scipy).get("stats") is bare:  # (not hasattr: scipy's lazy __getattr__ would import it)
                del scipy.stats
            if not done:
                for name in set(sys.modules) - before:
                    if name.startswith("scipy.stats"):
                        del sys.modules[name]


@lru_cache(maxsize=8)
def _base_cells(kind: str, R: int, dims: int, seed: int) -> np.ndarray:
    """(R, dims) uint32: the base sequence's cells on the 2^16 grid (kept for the run: R x dims)."""
    def make(qmc):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Sobol warns when R is not a power of two
            return (qmc.Sobol if kind == "sobol" else qmc.Halton)(d=dims, scramble=True, seed=seed).random(R)

    try:
        with _qmc() as qmc:
            points = make(qmc)
    except Exception:  # the engines failed without their package (_qmc): with it, as scipy documents them
        from scipy.stats import qmc
        points = make(qmc)
    return np.minimum((points * CELLS).astype(np.uint32), np.uint32(CELLS - 1))


@dataclass(frozen=True)
class Draws:
    """R draws of `dims` standard normals per unit, of `kind`, from `seed`."""

    kind: str = "sobol"
    R: int = 200
    dims: int = 1
    seed: int = 0
    table: np.ndarray = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        DRAW_KINDS.get(self.kind)
        object.__setattr__(self, "table", _inverse_normal_table())

    @property
    def max_abs(self) -> float:
        """The largest |normal| a draw can take (the table's end cells: about 4.4)."""
        return float(np.abs(self.table).max())

    def cells(self, units: np.ndarray, r0: int, r1: int) -> np.ndarray:
        """(n, r1 - r0, dims) uint32 grid cells of the draws r0:r1 of `units` (n,) (global indices)."""
        units = np.asarray(units, dtype=np.uint64)[:, None, None]
        dims = np.arange(self.dims, dtype=np.uint64)[None, None, :]
        if self.kind == "pseudo":
            r = np.arange(r0, r1, dtype=np.uint64)[None, :, None]
            return (_hash(self.seed, units, r, dims) & _MASK).astype(np.uint32)
        base = _base_cells(self.kind, self.R, self.dims, self.seed)[r0:r1][None, :, :]
        shift = (_hash(self.seed, units, dims) & _MASK).astype(np.uint32)
        if self.kind == "sobol":
            return base ^ shift
        return (base + shift) & np.uint32(CELLS - 1)

    def normals(self, units: np.ndarray, r0: int = 0, r1: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """(n, r1 - r0, dims) standard normal draws r0:r1 of `units` (n,); into `out` when given."""
        r1 = self.R if r1 is None else r1
        cells = self.cells(units, r0, r1)
        return np.take(self.table, cells, out=out)
