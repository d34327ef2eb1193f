"""estpipe: GMM estimation of logit choice models on large data.

The derivatives of the moments come from forward-mode dual blocks whose heavy step is one BLAS
matrix product per tile (see DESIGN.md).
"""

from __future__ import annotations

__version__ = "0.1.0"

from estpipe.errors import UserError  # noqa: E402

__all__ = ["UserError", "__version__", "logit_moments"]


def __getattr__(name):
    # The kernel is imported lazily so that `estpipe --help` stays fast.
    if name == "logit_moments":
        from estpipe.kernel import logit_moments

        return logit_moments
    raise AttributeError(name)
