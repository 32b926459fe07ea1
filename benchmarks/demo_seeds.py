"""The demo's figures over several seeds: what a figure quoted from one run is worth.

One demo run is one draw: its learned-MD ESS moved from 0.061 on one CPU to 0.038 on
another with the same code. This script runs ``diffenergy demo`` (``run_demo``) once per
seed, at the demo's own settings unless told otherwise, and reports every figure's mean,
standard deviation, minimum and maximum over the seeds, beside the per-seed values.

Writes ``benchmarks/results/demo_seeds.json``. Usage::

    python benchmarks/demo_seeds.py                 # seeds 0-4, the demo's settings
    python benchmarks/demo_seeds.py --seeds 0 1 2 --out /tmp/d.json
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import hardware, write_json  # noqa: E402

from openmm_diffenergy.demo import run_demo  # noqa: E402

FIGURES = ("ess_iid", "ess_md", "ess_md_annealed", "phi_rmse_kt_md", "phi_rmse_kt_md_annealed",
           "js_iid", "js_md", "spearman_learned_vs_classical", "slope_learned_vs_classical_kt")
HERE = os.path.dirname(os.path.abspath(__file__))


def spread(values) -> dict:
    """Mean, sample standard deviation, minimum and maximum of finite ``values``."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if v.size == 0:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--n-iid", type=int, default=128)
    p.add_argument("--md-ps", type=float, default=20.0)
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--n-compare", type=int, default=100)
    p.add_argument("--anneal-stages", type=int, default=50)
    p.add_argument("--out", default=os.path.join(HERE, "results", "demo_seeds.json"))
    args = p.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds) or len(args.seeds) < 2:
        p.error("--seeds needs at least two distinct seeds")
    torch.set_num_threads(1)
    settings = {k: getattr(args, k) for k in ("n_iid", "md_ps", "replicas", "n_compare",
                                              "anneal_stages")}
    runs, t0 = [], time.perf_counter()
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as out_dir:
            summary = run_demo(out_dir=out_dir, seed=seed, progress=False,
                               log=lambda *a, **k: None, **settings)
        runs.append({"seed": seed, **{k: summary.get(k) for k in FIGURES},
                     "seconds": summary.get("seconds")})
        print(f"seed {seed}: " + ", ".join(f"{k} {runs[-1][k]:.4g}" for k in FIGURES),
              flush=True)
    result = {"benchmark": "demo_seeds", "hardware": hardware(), "settings": settings,
              "seeds": args.seeds, "runs": runs,
              "spread": {k: spread([r[k] for r in runs]) for k in FIGURES},
              "seconds": time.perf_counter() - t0}
    for k in FIGURES:
        s = result["spread"][k]
        print(f"{k:32s} mean {s['mean']:.4g}  std {s['std']:.2g}  "
              f"range {s['min']:.4g} .. {s['max']:.4g}")
    write_json(args.out, result)
    print(f"wrote {args.out} ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
