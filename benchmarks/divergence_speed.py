"""Speed and accuracy of the divergence estimators on the shipped alanine-dipeptide models.

At D = 66 (all-atom model, 22 atoms) and D = 15 (coarse-grained model, 5 beads), batch
256, all on the same model in one run, the script times the divergence of the score:

- ``fast``: exact, forward-Laplacian propagation with the compiled ``diffenergy`` operators;
- ``fast_torch``: the same propagation in plain torch (the fallback);
- ``autograd_loop``: one ``torch.autograd.grad`` of ``score[:, i]`` per dimension i, as
  DiffEnergy and TBG compute it;
- ``vmap``: exact, the D Jacobian rows vectorized with ``torch.func`` (``ExactDivergence``);
- ``hutchinson_k1``/``_k4``: Hutchinson with 1 and 4 Rademacher probes (``vjp`` route);
- ``fast_hutchinson_k1``/``_k4``: the probes pushed forward through the fused operators.

It also times an exact probability-flow ``-log p0`` (``de.nll(..., path="flow",
divergence="fast")``, RK4, 100 steps) of alanine-dipeptide structures from the reference
MD, per sample. Results are printed and written to benchmarks/results/divergence_speed.json;
GPU figures are added where CUDA is available.

Usage::

    python benchmarks/divergence_speed.py               # full run
    python benchmarks/divergence_speed.py --quick       # smoke run (small batch, few steps)
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import hardware, write_json  # noqa: E402

import openmm_diffenergy as de  # noqa: E402
from openmm_diffenergy import ops  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def autograd_loop(model, y, t):
    """Divergence of the score, one reverse pass per dimension (DiffEnergy/TBG style)."""
    with torch.enable_grad():
        y = y.detach().requires_grad_(True)
        s = -torch.autograd.grad(model(y, t).sum(), y, create_graph=True)[0]
        div = torch.zeros(y.shape[0], dtype=y.dtype, device=y.device)
        for i in range(y.shape[1]):
            div = div + torch.autograd.grad(s[:, i].sum(), y, retain_graph=True)[0][:, i]
    return s.detach(), div.detach()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, repeats, device):
    """Median wall time of ``repeats`` calls after one warm-up call; and the last result."""
    out = fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def methods(model):
    fn = de.score_fn(model)

    def fast_torch(y, t):
        with ops.torch_fallback():
            return de.FastDivergence()(fn, y, t)

    return {
        "fast": lambda y, t: de.FastDivergence()(fn, y, t),
        "fast_torch": fast_torch,
        "autograd_loop": lambda y, t: autograd_loop(model, y, t),
        "vmap": lambda y, t: de.ExactDivergence()(fn, y, t),
        "hutchinson_k1": lambda y, t: de.HutchinsonDivergence(1, seed=0)(fn, y, t),
        "hutchinson_k4": lambda y, t: de.HutchinsonDivergence(4, seed=0)(fn, y, t),
        "fast_hutchinson_k1": lambda y, t: de.FusedHutchinsonDivergence(1, seed=0)(fn, y, t),
        "fast_hutchinson_k4": lambda y, t: de.FusedHutchinsonDivergence(4, seed=0)(fn, y, t),
    }


def inputs(model, batch, device, dtype, y0=None, seed=0):
    """Diffused configurations ``alpha(t) y0 + sigma(t) noise`` at times in [t_min, 1]."""
    g = torch.Generator().manual_seed(seed)
    if y0 is None:
        y0 = torch.randn(batch, model.dim, generator=g, dtype=torch.float64)
    t = model.t_min + (1 - model.t_min) * torch.rand(batch, generator=g, dtype=torch.float64)
    noise = de.centre(torch.randn(batch, model.dim, generator=g, dtype=torch.float64),
                      model.n_particles)
    y = model.sde.alpha(t)[:, None] * y0 + model.sde.sigma(t)[:, None] * noise
    return y.to(device, dtype), t.to(device, dtype)


def reference_structures(model, n):
    """``n`` alanine-dipeptide frames of the reference MD, in model coordinates (or None)."""
    path = os.path.join(ROOT, "data", "ala2_vacuum.npz")
    if not os.path.exists(path):
        return None
    xyz = np.load(path)["xyz"]
    idx = np.linspace(0, len(xyz) - 1, n).astype(int)
    x = torch.as_tensor(xyz[idx], dtype=torch.float64)
    return de.centre(model.to_model_coordinates(x), model.n_particles)


def bench_system(name, model, batch, device, dtype, repeats, y0=None):
    model = model.to(device, dtype)
    y, t = inputs(model, batch, device, dtype, y0)
    row = {"dof_all": model.dim, "dof": model.dof, "batch": batch, "dtype": str(dtype)}
    results = {}
    for key, fn in methods(model).items():
        slow = key == "autograd_loop" or (key == "vmap" and device.type == "cpu")
        seconds, results[key] = timed(lambda: fn(y, t), max(1, repeats // 3) if slow
                                      else repeats, device)
        row[f"{key}_seconds"] = seconds
        print(f"  {name} {key:20s} {seconds * 1e3:9.2f} ms", flush=True)
    ref = results["vmap"][1]
    for key in ("fast", "fast_torch", "autograd_loop"):
        row[f"max_rel_err_{key}"] = ((results[key][1] - ref).abs() / ref.abs()).max().item()
    for key in ("hutchinson_k1", "hutchinson_k4"):   # same probes: fused equals vjp route
        fused = results[f"fast_{key}"][1]
        row[f"max_rel_diff_fused_{key}"] = ((fused - results[key][1]).abs()
                                            / results[key][1].abs()).max().item()
    for key in ("autograd_loop", "vmap", "fast_torch", "hutchinson_k1", "hutchinson_k4"):
        row[f"speedup_vs_{key}"] = row[f"{key}_seconds"] / row["fast_seconds"]
    print(f"  {name}: fast is {row['speedup_vs_autograd_loop']:.1f}x the autograd loop, "
          f"{row['speedup_vs_vmap']:.1f}x vmap, {row['speedup_vs_fast_torch']:.2f}x plain "
          f"torch; max rel err {row['max_rel_err_fast']:.1e}", flush=True)
    return row


def bench_nll(model, n, steps, device):
    x = reference_structures(model, n)
    source = "reference MD frames (data/ala2_vacuum.npz)"
    if x is None:
        x = inputs(model, n, "cpu", torch.float64)[0]
        source = "random unit-variance configurations (reference data absent)"
    x = (x * model.length_scale).reshape(n, -1, 3).to(device)
    model = model.to(device)
    start = time.perf_counter()
    res = de.nll(model, None, x, path="flow", divergence="fast", steps=steps)
    sync(device)
    seconds = time.perf_counter() - start
    out = {"samples": n, "steps": steps, "solver": "rk4", "nfe": res.method["nfe"],
           "seconds": seconds, "seconds_per_sample": seconds / n,
           "mean_nll": res.nll.mean().item(), "samples_from": source,
           "model_dtype": str(next(model.parameters()).dtype),
           "backend": res.method.get("backend")}
    print(f"  flow -log p0 (fast, {steps} RK4 steps, {n} samples): {seconds:.1f} s, "
          f"{seconds / n * 1e3:.1f} ms per sample", flush=True)
    return out


def run_device(device, args, dtype):
    aa = de.load_model(os.path.join(ROOT, "models", "ala2_aa.pt"))
    cg = de.load_model(os.path.join(ROOT, "models", "ala2_cg.pt"))
    y0 = reference_structures(aa, args.batch)
    out = {"d66": bench_system("D=66", aa, args.batch, device, dtype, args.repeats, y0),
           "d15": bench_system("D=15", cg, args.batch, device, dtype, args.repeats)}
    out["nll"] = bench_nll(de.load_model(os.path.join(ROOT, "models", "ala2_aa.pt")),
                           args.nll_samples, args.nll_steps, device)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small settings (smoke test)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's default, all cores)")
    ap.add_argument("--dtype", choices=["float64", "float32"], default="float64",
                    help="dtype of the divergence timings (the nll uses the model's own)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "divergence_speed.json"))
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.batch = 16 if args.quick else 256
    args.repeats = 2 if args.quick else 7
    args.nll_samples = 4 if args.quick else 64
    args.nll_steps = 4 if args.quick else 100
    dtype = getattr(torch, args.dtype)
    print(f"diffenergy ops: {'loaded from ' + ops.library_path() if ops.available() else ops.load_error()}; "
          f"{torch.get_num_threads()} threads", flush=True)
    load_start = os.getloadavg()[0]
    cpu = run_device(torch.device("cpu"), args, dtype)
    lib = ops.library_path()
    data = {"hardware": hardware(), "ops_library": lib and os.path.relpath(lib, ROOT),
            "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},
            "ops_cuda_kernels": ops.cuda_available(), "quick": args.quick,
            "cpu": cpu,
            "speedup_vs_autograd_loop_d66": cpu["d66"]["speedup_vs_autograd_loop"],
            "speedup_vs_vmap_d66": cpu["d66"]["speedup_vs_vmap"],
            "speedup_vs_fast_torch_d66": cpu["d66"]["speedup_vs_fast_torch"],
            "max_rel_err_fast_d66": cpu["d66"]["max_rel_err_fast"],
            "nll_seconds_per_sample": cpu["nll"]["seconds_per_sample"],
            "targets_cpu": {"speedup_vs_autograd_loop_d66": 5.0, "speedup_vs_vmap_d66": 2.0}}
    if torch.cuda.is_available():
        gpu = run_device(torch.device("cuda"), args, dtype)
        data["gpu"] = gpu
        data.update({"gpu_speedup_vs_autograd_loop_d66": gpu["d66"]["speedup_vs_autograd_loop"],
                     "gpu_speedup_vs_vmap_d66": gpu["d66"]["speedup_vs_vmap"],
                     "gpu_max_rel_err_fast_d66": gpu["d66"]["max_rel_err_fast"],
                     "gpu_nll_seconds_per_sample": gpu["nll"]["seconds_per_sample"]})
    write_json(args.out, data)
    print(f"wrote {args.out}")
    return data


if __name__ == "__main__":
    main()
