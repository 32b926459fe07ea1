"""MD throughput of a learned energy inside OpenMM.

A 22-particle DistanceMLPEnergy (231 pairwise distances, 2 x 64 SiLU, float32) with a
harmonic chain prior, Langevin at 300 K, 1 fs, on OpenMM's Reference and CPU platforms
(the headline figure of each kind is the faster platform's). Measures in one run: steps/s through TorchForce (module returns its own forces, and autograd left
to OpenMM-Torch), through PythonForce, a bare TorchScript forward+backward loop of the
same module, and aggregate replica-steps/s for 1, 8 and 64 replicas in one System.
Writes benchmarks/results/md_throughput.json.

Torch runs with one intra-op thread by default: on 2 cores, torch's second thread and
OpenMM's CPU-platform threads contend, and 64 replicas ran about 8x slower with 2
torch threads than with 1 (measured here, see the README).

Usage::

    python benchmarks/md_throughput.py [--seconds 3] [--quick]
"""
import argparse
import os
import sys
import time

import numpy as np
import openmm
import torch
from openmm import unit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import hardware, write_json  # noqa: E402

import openmm_diffenergy as de  # noqa: E402
from openmm_diffenergy.openmm_force import create_force  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
N = 22


def chain_system(n_replicas):
    base = openmm.System()
    for _ in range(N):
        base.addParticle(12.0)
    bonds = openmm.HarmonicBondForce()
    for i in range(N - 1):
        bonds.addBond(i, i + 1, 0.15, 2000.0)
    base.addForce(bonds)
    return de.replicate_system(base, n_replicas)


def start_positions(n_replicas):
    rng = np.random.default_rng(0)
    one = np.cumsum(rng.normal(size=(N, 3)) * 0.087, axis=0)
    return np.concatenate([one + 2.0 * r for r in range(n_replicas)])


def steps_per_second(model, n_replicas, seconds, platform="CPU", **force_kwargs):
    system = chain_system(n_replicas)
    system.addForce(create_force(model, n_replicas=n_replicas, **force_kwargs))
    integ = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond,
                                            0.001 * unit.picoseconds)
    ctx = openmm.Context(system, integ, openmm.Platform.getPlatformByName(platform))
    ctx.setPositions(start_positions(n_replicas))
    integ.step(50)
    steps, chunk, t0 = 0, 50, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        integ.step(chunk)
        steps += chunk
    rate = steps / (time.perf_counter() - t0)
    pos = ctx.getState(getPositions=True).getPositions(asNumpy=True)._value
    if not np.isfinite(pos).all():
        raise RuntimeError("the benchmark simulation blew up")
    return rate


def bare_loop(model, seconds):
    """Forward + backward of the TorchForce module itself, from a Python loop."""
    from openmm_diffenergy.openmm_force import TorchEnergy, _BatchedEnergy, kt_kj_per_mol

    core = torch.jit.trace(_BatchedEnergy(model, model.t_min, 1), torch.randn(1, 3 * N),
                           check_trace=False)
    module = torch.jit.script(TorchEnergy(core, torch.arange(N), 1, 3 * N, model.length_scale,
                                          kt_kj_per_mol(300), torch.float32))
    pos = torch.tensor(start_positions(1), dtype=torch.float32)
    for _ in range(50):
        p = pos.clone().requires_grad_(True)
        module(p).backward()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(50):
            p = pos.clone().requires_grad_(True)
            module(p).backward()
        n += 50
    return n / (time.perf_counter() - t0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="timing window per figure")
    ap.add_argument("--quick", action="store_true", help="short windows (smoke test)")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch intra-op threads; more than 1 fights OpenMM's CPU threads")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "md_throughput.json"))
    args = ap.parse_args(argv)
    seconds = 0.3 if args.quick else args.seconds
    torch.set_num_threads(args.torch_threads)
    model = de.DistanceMLPEnergy(N, hidden=64, layers=2, seed=0, length_scale=1.0)

    res = {"bare_loop_evals_per_s": bare_loop(model, seconds), "by_platform": {}}
    for platform in ("Reference", "CPU"):
        p = res["by_platform"][platform] = {}
        p["torchforce_steps_per_s"] = steps_per_second(model, 1, seconds, platform,
                                                       outputs_forces=True)
        p["torchforce_autograd_steps_per_s"] = steps_per_second(model, 1, seconds, platform,
                                                                outputs_forces=False)
        p["pythonforce_steps_per_s"] = steps_per_second(model, 1, seconds, platform,
                                                        backend="pythonforce")
        p["replica_steps_per_s"] = {str(r): r * steps_per_second(model, r, seconds, platform)
                                    for r in (1, 8, 64)}
        print(f"{platform}: " + ", ".join(
            f"{k} {v:.0f}" if not isinstance(v, dict) else
            f"{k} " + "/".join(f"{x:.0f}" for x in v.values()) for k, v in p.items()),
            flush=True)
    # headline figures: the faster platform for each
    plats = res["by_platform"]
    for key in ("torchforce_steps_per_s", "pythonforce_steps_per_s"):
        best = max(plats, key=lambda q: plats[q][key])
        res[key] = plats[best][key]
        res[key.replace("_steps_per_s", "_platform")] = best
    best = max(plats, key=lambda q: plats[q]["replica_steps_per_s"]["64"])
    res["replica_steps_per_s"] = plats[best]["replica_steps_per_s"]
    res["replica_platform"] = best
    print(f"bare loop {res['bare_loop_evals_per_s']:.0f} evals/s; TorchForce "
          f"{res['torchforce_steps_per_s']:.0f} steps/s ({res['torchforce_platform']}); "
          f"PythonForce {res['pythonforce_steps_per_s']:.0f} steps/s "
          f"({res['pythonforce_platform']}); replicas 1/8/64: " + ", ".join(
              f"{x:.0f}" for x in res["replica_steps_per_s"].values())
          + f" replica-steps/s ({res['replica_platform']})")
    best_tf = res["torchforce_steps_per_s"]
    rep = res["replica_steps_per_s"]
    targets = {"torchforce_ge_0.8x_bare_loop": best_tf >= 0.8 * res["bare_loop_evals_per_s"],
               "replicas_64_ge_16x_one": rep["64"] >= 16 * rep["1"]}
    res["torchforce_over_bare_loop"] = best_tf / res["bare_loop_evals_per_s"]
    res["replica_64_over_1"] = rep["64"] / rep["1"]
    print(f"TorchForce / bare loop = {res['torchforce_over_bare_loop']:.2f}; "
          f"64 replicas / 1 = {res['replica_64_over_1']:.1f}")
    print("targets:", ", ".join(f"{k}: {'PASS' if v else 'FAIL'}" for k, v in targets.items()))
    write_json(args.out, {"benchmark": "md_throughput", "quick": args.quick,
                          "torch_threads": args.torch_threads, "n_particles": N, "model": model.config(),
                          "hardware": hardware(), "targets": targets, **res})
    print(f"wrote {args.out}")
    return res, targets


if __name__ == "__main__":
    main()
