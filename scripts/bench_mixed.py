"""Mixed logit: estpipe's value and value + Jacobian of the simulated moments against JAX's
jit(jacfwd) of the same moments on the same data and draws, interleaved in one process.

    python scripts/bench_mixed.py [--sets 4000 --alternatives 3 --params 10 --random 3 --draws 1000 --moments 16]

The moments: h_i = sum_j sbar_ij dm_ij, sbar the mean over the unit's R draws of the logit
probabilities, u_ijr = x_ij' b + sum_{k random} x_ijk sd_k eta_irk (normal random coefficients).
estpipe's side is the kernel the estimator uses (PartitionKernel.sums: the value alone, and value +
Jacobian), which makes its draws as it goes; JAX gets the same draws as an array (made once by
estpipe's Draws, outside the timing) and evaluates in batches of sets so that it fits in memory;
its compile time is excluded. Medians of interleaved repetitions; float64 both. JAX is not a
dependency of estpipe: run it in an environment that has it (/work/venvs/bench here).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import interleaved_medians  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", type=int, default=4000)
    ap.add_argument("--alternatives", type=int, default=3)
    ap.add_argument("--params", type=int, default=10)
    ap.add_argument("--random", type=int, default=3)
    ap.add_argument("--draws", type=int, default=1000)
    ap.add_argument("--moments", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--jax-batch", type=int, default=0, help="sets per JAX batch (default: fit ~256 MB)")
    ap.add_argument("--no-jax", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    from estpipe.data.format import ChoiceData
    from estpipe.kernel import PartitionKernel
    from estpipe.models import get_model

    n, J, K, Kr, R, M = a.sets, a.alternatives, a.params, a.random, a.draws, a.moments

    class Facts:
        x_names = [f"x{k + 1}" for k in range(K)]
        alt_names = None
        has_panel = False

    rng = np.random.default_rng(0)
    X = rng.standard_normal((n * J, K))
    dm = rng.standard_normal((n * J, M))
    offsets = np.arange(0, n * J + 1, J, dtype=np.int64)
    model = get_model("mixed-logit").bind(Facts, random=",".join(Facts.x_names[:Kr]), draws=R, draws_kind="halton")
    kernel = PartitionKernel(ChoiceData(X=X, dm=dm, offsets=offsets), model=model, x_names=Facts.x_names)
    theta = np.r_[0.3 * rng.standard_normal(K), np.full(Kr, 0.5)]
    P = len(theta)

    calls = {
        "value": lambda: kernel.sums(theta, jacobian=False),
        "value+jacobian": lambda: kernel.sums(theta),
    }
    jax_g = None
    if not a.no_jax:
        import jax
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp

        eta = model.draws.normals(np.arange(n))  # (n, R, Kr): the same draws, as an array
        batch = a.jax_batch or max(1, min(n, (256 * 2**20) // (8 * J * R * (P + 2))))
        Xb = X.reshape(n, J, K)
        dmb = dm.reshape(n, J, M)

        def moments(th, Xs, dms, es):
            b = th[:K]
            sd = th[K:]
            beta = b[None, None, :Kr] + sd[None, None, :] * es  # (nb, R, Kr)
            u = jnp.einsum("njk,k->nj", Xs[:, :, Kr:], b[Kr:])[:, :, None] + jnp.einsum("njk,nrk->njr", Xs[:, :, :Kr], beta)
            s = jax.nn.softmax(u, axis=1).mean(axis=2)  # (nb, J)
            return jnp.einsum("nj,njm->m", s, dms)

        value_fn = jax.jit(moments)
        jac_fn = jax.jit(jax.jacfwd(moments))
        chunks = [(i, min(n, i + batch)) for i in range(0, n, batch)]
        args = [(jnp.asarray(Xb[i:j]), jnp.asarray(dmb[i:j]), jnp.asarray(eta[i:j])) for i, j in chunks]
        th = jnp.asarray(theta)

        def jax_value():
            return sum(value_fn(th, *x).block_until_ready() for x in args)

        def jax_jacobian():
            return sum(value_fn(th, *x).block_until_ready() for x in args), sum(jac_fn(th, *x).block_until_ready() for x in args)

        jax_value()
        jax_jacobian()  # compile both (excluded)
        calls["jax value"] = jax_value
        calls["jax jit(jacfwd)"] = jax_jacobian
        jax_g = np.asarray(jax_value()) / n
    med = interleaved_medians(calls, a.repeat)
    out = {"sets": n, "alternatives": J, "K": K, "random": Kr, "draws": R, "M": M, "threads": kernel.threads,
           "median_seconds": med, "ratio_to_value": {k: v / med["value"] for k, v in med.items()},
           "buffer_bytes_per_batch": int(8 * kernel.tiles[0].seg.n_rows * max(1, min(R, (8 * 2**20) // (8 * kernel.tiles[0].seg.n_rows)))),
           "cpu": os.cpu_count()}
    if jax_g is not None:
        out["max_abs_difference_g"] = float(np.abs(kernel.sums(theta, jacobian=False).g - jax_g).max())
    if a.json:
        print(json.dumps(out, indent=1))
    else:
        print(f"mixed logit {n} sets x {J}, K = {K} ({Kr} random), R = {R}, M = {M}; {kernel.threads} threads; "
              f"medians of {a.repeat}")
        for k, v in med.items():
            print(f"  {k:<18} {v * 1e3:10.1f} ms   x value {v / med['value']:6.2f}")
        if jax_g is not None:
            print(f"  max |g estpipe - g jax| = {out['max_abs_difference_g']:.2e}")


if __name__ == "__main__":
    main()
