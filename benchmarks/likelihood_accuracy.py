"""Accuracy of -log p0 against exact Gaussian-mixture densities.

Systems: the three-mode 1D mixture (Chen, Chu, Gray et al. 2025), a 2D anisotropic
mixture, and a 22-particle mixture (D = 63 after centring), all under the VP SDE. For
each estimator the script prints, and writes to benchmarks/results/likelihood_accuracy.json,
the mean and max absolute error, the signed mean error and its standard error, the
steps, function evaluations and seconds.

Usage::

    python benchmarks/likelihood_accuracy.py            # full: 1000 points per system
    python benchmarks/likelihood_accuracy.py --quick    # small smoke run
"""
import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import hardware, write_json  # noqa: E402

import openmm_diffenergy as de  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def stats(est, exact):
    err = est - exact
    n = err.shape[0]
    return {"n": n, "mean_abs_err": err.abs().mean().item(), "max_abs_err": err.abs().max().item(),
            "mean_err": err.mean().item(), "stderr_mean_err": (err.std() / math.sqrt(n)).item()}


def run(name, fn, exact_fn):
    t0 = time.perf_counter()
    res = fn()
    seconds = time.perf_counter() - t0
    x = getattr(res, "x", None)
    exact = exact_fn(x)
    out = {**stats(res.nll, exact), "seconds": seconds,
           **{k: v for k, v in res.method.items() if k in
              ("path", "solver", "scheme", "steps", "nfe", "estimator", "n_probes",
               "distribution", "grid_power", "method")}}
    print(f"  {name:34s} mean|err| {out['mean_abs_err']:.2e}  max|err| {out['max_abs_err']:.2e}"
          f"  signed {out['mean_err']:+.2e} +- {out['stderr_mean_err']:.1e}"
          f"  nfe {out['nfe']:5d}  {seconds:6.1f} s", flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small settings (smoke test)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "likelihood_accuracy.json"))
    args = ap.parse_args(argv)
    n = 64 if args.quick else 1000
    flow_steps = 20 if args.quick else 100
    path_steps = 40 if args.quick else 200
    long_steps = 100 if args.quick else 1000
    bs = 250
    sde = de.VPSDE()
    gen = torch.Generator().manual_seed(2025)
    results = {}

    systems = {"gmm_1d": de.mixture_1d(sde), "gmm_2d": de.mixture_2d(sde),
               "particles_22": de.particle_mixture(22, 3, seed=0, sde=sde)}
    for sys_name, gm in systems.items():
        x = gm.sample(n, gen)
        exact = -gm.log_prob(x)
        print(f"{sys_name}: D = {gm.dof}, {n} points drawn from p0", flush=True)

        def at_x(_):
            return exact

        def at_samples(xs):
            return -gm.log_prob(xs)

        probe = "gaussian" if gm.dof == 1 else "rademacher"   # Rademacher is exact in 1D
        runs = {
            "flow_exact_rk4": lambda: de.nll(gm, sde, x, "flow", "exact", steps=flow_steps,
                                             batch_size=bs),
            "flow_exact_dopri5": lambda: de.nll(gm, sde, x, "flow", "exact", solver="dopri5",
                                                rtol=1e-7, atol=1e-9, batch_size=bs),
            "flow_hutchinson_k1": lambda: de.nll(gm, sde, x, "flow", "hutchinson",
                                                 steps=flow_steps, seed=1, probe=probe,
                                                 batch_size=bs),
            "diffusion_simpson": lambda: de.nll(gm, sde, x, "diffusion", "exact",
                                                steps=path_steps, seed=2, batch_size=bs),
        }
        if sys_name == "particles_22":
            runs.pop("flow_exact_dopri5")   # same answer as RK4 here, at 3x the cost
        if sys_name == "gmm_1d":
            runs["diffusion_trapezoid"] = lambda: de.nll(
                gm, sde, x, "diffusion", "exact", steps=long_steps, seed=2, scheme="trapezoid")
            runs["diffusion_ito"] = lambda: de.nll(
                gm, sde, x, "diffusion", "exact", steps=long_steps, seed=2, scheme="ito")
        results[sys_name] = {"dof": gm.dof}
        for run_name, fn in runs.items():
            results[sys_name][run_name] = run(run_name, fn, at_x)
        if sys_name == "gmm_1d":
            results[sys_name]["reverse_sde_own_path"] = run(
                "reverse_sde_own_path",
                lambda: de.sample(gm, sde, n, steps=long_steps // 2, seed=3), at_samples)

    r1, r63 = results["gmm_1d"], results["particles_22"]
    hut = [results[s]["flow_hutchinson_k1"] for s in results]
    targets = {
        "flow_exact_1d_mean_le_1e-3": r1["flow_exact_rk4"]["mean_abs_err"] <= 1e-3,
        "flow_exact_d63_mean_le_1e-2": r63["flow_exact_rk4"]["mean_abs_err"] <= 1e-2,
        "diffusion_1d_mean_le_0.05": r1["diffusion_simpson"]["mean_abs_err"] <= 0.05,
        "hutchinson_k1_within_2_stderr": all(
            abs(h["mean_err"]) <= 2 * h["stderr_mean_err"] for h in hut),
    }
    print("targets:", ", ".join(f"{k}: {'PASS' if v else 'FAIL'}" for k, v in targets.items()))
    write_json(args.out, {"benchmark": "likelihood_accuracy", "quick": args.quick,
                          "sde": sde.config(), "hardware": hardware(), "targets": targets,
                          "results": results})
    print(f"wrote {args.out}")
    return results, targets


if __name__ == "__main__":
    main()
