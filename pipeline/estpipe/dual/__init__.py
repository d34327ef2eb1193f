"""Forward-mode dual blocks: values and partials in one (rows, 1 + P) array, one GEMM per tile.

- `Dual` and its primitives (block.py), each with its tangent rule beside it;
- `Segments`: the choice sets of a tile as CSR offsets, with a reshape fast path (segments.py);
- `Groups`: groups of rows inside the sets (a nest within one set), with sums, log-sum-exp and
  softmax over them (groups.py);
- `Workspace`: buffers allocated once per kernel and reused (workspace.py);
- `chunk_size`: how many partials a block carries (chunks.py).
"""

from estpipe.dual.block import (
    Dual,
    add,
    broadcast,
    divide,
    exp,
    linear,
    log,
    multiply,
    negative,
    power,
    project,
    project_softmax,
    reciprocal,
    seed,
    segment_logsumexp,
    segment_max,
    segment_softmax,
    segment_sum,
    subtract,
)
from estpipe.dual.chunks import MAX_CHUNK, chunk_ranges, chunk_size
from estpipe.dual.draw_axis import mean_draws, repeat_draws, sum_draws
from estpipe.dual.groups import Groups, group_broadcast, group_logsumexp, group_softmax, group_sum
from estpipe.dual.segments import Segments
from estpipe.dual.workspace import Workspace

__all__ = [
    "Dual", "Groups", "MAX_CHUNK", "Segments", "Workspace", "add", "broadcast", "chunk_ranges", "chunk_size",
    "divide", "exp", "group_broadcast", "group_logsumexp", "group_softmax", "group_sum", "linear", "log",
    "mean_draws", "multiply", "negative", "power", "project", "project_softmax", "reciprocal",
    "repeat_draws", "seed", "sum_draws",
    "segment_logsumexp", "segment_max", "segment_softmax", "segment_sum", "subtract",
]
