"""How many partials one dual block carries at a time (ForwardDiff's `Chunk`).

Rule: carry all P partials in one block when P <= MAX_CHUNK; otherwise split the parameters into
the fewest chunks of at most MAX_CHUNK and make them as equal as possible (ForwardDiff's
balanced chunking). Why: every chunk recomputes the values, so fewer chunks is less work, but the
block is (tile_rows, 1 + chunk) and should stay in cache between the model's operations and
the GEMM; with 16,384-row tiles, 64 partials make an 8.5 MB block, a quarter of this machine's L3. Chunks trade a little
recomputation for a bounded buffer, and every chunk size gives the same Jacobian (tested).
"""

from __future__ import annotations

MAX_CHUNK = 64


def chunk_size(n_params: int, requested: int | None = None) -> int:
    """Partials per block for n_params parameters; `requested` overrides the rule (clipped to [1, P])."""
    if requested is not None:
        return max(1, min(int(requested), max(n_params, 1)))
    if n_params <= MAX_CHUNK:
        return max(n_params, 1)
    n_chunks = -(-n_params // MAX_CHUNK)
    return -(-n_params // n_chunks)


def chunk_ranges(n_params: int, size: int) -> list[tuple[int, int]]:
    """The parameter ranges [k0, k1) of each chunk."""
    return [(k0, min(n_params, k0 + size)) for k0 in range(0, max(n_params, 1), size)]
