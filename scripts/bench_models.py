"""Models through the kernel: value + full Jacobian against the value alone, interleaved in one run.

    python scripts/bench_models.py [--model nested-logit --sets 100000 --alternatives 10 --nests 3
                                    --params 10 --moments 20 --repeat 7]

"The value" is the fastest value-only evaluation the optimizer uses: PartitionKernel.evaluate of a
Request without the Jacobian, on the strategy the kernel picks for the model (for the nested
logit, kernel/fused_nested.py). Also timed: the same two on the generic dual strategy (fast=False:
the model's reference probabilities through the dual operations), so one run gives every ratio.
Medians of interleaved repetitions, same threads (the kernel's default: the BLAS thread count).

Data: J alternatives "a1".."aJ" in every set, split into N contiguous nests "n1".."nN" (sizes as
equal as possible), X and dm standard normal, lambdas in (0.3, 0.9).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import interleaved_medians  # noqa: E402


def nests_text(J: int, N: int) -> str:
    sizes = [J // N + (1 if i < J % N else 0) for i in range(N)]
    out, a = [], 1
    for i, size in enumerate(sizes):
        out.append(f"n{i + 1}=" + ",".join(f"a{a + j}" for j in range(size)))
        a += size
    return "; ".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="nested-logit", choices=["nested-logit"])
    ap.add_argument("--sets", type=int, default=100_000)
    ap.add_argument("--alternatives", type=int, default=10)
    ap.add_argument("--nests", type=int, default=3)
    ap.add_argument("--params", type=int, default=10)
    ap.add_argument("--moments", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--no-generic", action="store_true", help="skip the generic dual strategy")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    from estpipe.data.format import ChoiceData
    from estpipe.kernel import PartitionKernel
    from estpipe.kernel.request import Request
    from estpipe.models import get_model

    n, J, N, K, M = a.sets, a.alternatives, a.nests, a.params, a.moments

    class Facts:
        x_names = [f"x{k + 1}" for k in range(K)]
        alt_names = [f"a{j + 1}" for j in range(J)]
        has_panel = False

    rng = np.random.default_rng(0)
    data = ChoiceData(X=rng.standard_normal((n * J, K)), dm=rng.standard_normal((n * J, M)),
                      offsets=np.arange(0, n * J + 1, J, dtype=np.int64), alt=np.tile(np.arange(J, dtype=np.int32), n))
    model = get_model(a.model).bind(Facts, nests=nests_text(J, N))
    P = model.n_params(K)
    theta = np.r_[0.3 * rng.standard_normal(K), np.log(rng.uniform(0.3, 0.9, P - K))]
    kernels = {"": PartitionKernel(data, model=model, x_names=Facts.x_names)}
    if not a.no_generic:
        kernels["generic "] = PartitionKernel(data, model=model, fast=False, x_names=Facts.x_names)
    value, full = Request.of(theta, jacobian=False), Request.of(theta, jacobian=True)
    calls = {}
    for label, kernel in kernels.items():
        calls[f"{label}value"] = (lambda k: lambda: k.evaluate(value))(kernel)
        calls[f"{label}value+jacobian"] = (lambda k: lambda: k.evaluate(full))(kernel)
    med = interleaved_medians(calls, a.repeat)
    fast = kernels[""]
    out = {"model": a.model, "sets": n, "alternatives": J, "nests": N, "K": K, "P": P, "M": M,
           "strategy": fast.strategy.name, "threads": fast.threads, "repeat": a.repeat,
           "median_seconds": med, "ratio_to_value": {k: v / med["value"] for k, v in med.items()},
           "cpu": os.cpu_count()}
    if "generic " in kernels:
        g = kernels["generic "].evaluate(full).gG
        out["max_abs_difference_gG_fused_generic"] = float(np.abs(fast.evaluate(full).gG - g).max())
    if a.json:
        print(json.dumps(out, indent=1))
        return
    print(f"{a.model} {n} sets x {J} in {N} nests, K = {K} (P = {P}), M = {M}; strategy {fast.strategy.name}; "
          f"{fast.threads} threads; medians of {a.repeat}")
    for k, v in med.items():
        print(f"  {k:<26} {v * 1e3:10.1f} ms   x value {v / med['value']:6.2f}")
    if "max_abs_difference_gG_fused_generic" in out:
        print(f"  max |gG fused - gG generic| = {out['max_abs_difference_gG_fused_generic']:.2e}")


if __name__ == "__main__":
    main()
