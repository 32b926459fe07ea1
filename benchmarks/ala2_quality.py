"""Quality of the shipped alanine-dipeptide models against reference MD.

For each model (all-atom, coarse-grained): the Jensen-Shannon divergence (natural log)
of the 64 x 64 phi/psi histogram between reference MD and (a) i.i.d. samples drawn with
the reverse SDE and ``--corrector-steps`` Metropolis-adjusted Langevin steps on the model's
own ``exp(-E(x, t_min))`` (independent chains, :func:`openmm_diffenergy.mala`; the JS of
the reverse SDE alone is reported beside it as ``*_js_iid_sde``), (b) OpenMM Langevin MD driven by the exported learned force alone:
many replicas in one Context (one batched TorchForce), started from reference frames,
with the first ``--equilibration-ps`` of each discarded. The all-atom reference is
L-alanine; the model also draws D-alanine, so its i.i.d. samples are mirror-folded into L
(:func:`openmm_diffenergy.mirror_fold`, an exact sampler of density ``q(x) + q(Rx)``;
``--no-fold`` turns it off) and the raw JS is reported beside it. For the all-atom model
also: the mean Wasserstein-1 distance of bond lengths (i.i.d. samples vs reference), the
fraction of L-chiral samples, the fraction of MD frames whose bonded topology is intact
(every bond within 0.8-1.25x its reference mean), and one long replica at 1 fs for
stability. The JS between the two halves of the reference run is printed as the
estimate's finite-sample floor. Writes benchmarks/results/ala2_quality.json.

Usage::

    python benchmarks/ala2_quality.py [--quick]
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import hardware, write_json  # noqa: E402

import openmm  # noqa: E402

import openmm_diffenergy as de  # noqa: E402
from openmm_diffenergy.ala2 import load_reference, phi_psi, phi_psi_js  # noqa: E402
from openmm_diffenergy.alanine import is_l_chiral  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def js_divergence(a, b) -> float:
    """JS divergence (nats) between the 64 x 64 phi/psi histograms of two sample sets."""
    return phi_psi_js(a, b, bins=64)


def bond_lengths(xyz, bonds):
    return np.linalg.norm(xyz[:, bonds[:, 0]] - xyz[:, bonds[:, 1]], axis=-1)


def run_md(model, masses, n_replicas, ns, dt_fs, start, seed, save_ps=1.0, equilibration_ps=0.0,
           t_read=None):
    """Langevin MD at 300 K with the learned force only (:func:`de.run_learned_md`, all
    replicas in one Context); frames (R, F, N, 3) nm saved after ``equilibration_ps``,
    up to a blow-up."""
    base = openmm.System()
    for m in masses:
        base.addParticle(m)
    runs = de.run_learned_md(model, base, start, temperature=300.0,
                             n_frames=int(round(ns * 1000 / save_ps)), save_interval=save_ps,
                             timestep=dt_fs / 1000.0, equilibration=equilibration_ps,
                             n_replicas=n_replicas, seed=seed, t_min=t_read)
    return np.stack([r["frames"] for r in runs])


def md_quality(kind, model, ref, ref_pp, bonds, ref_len, n_replicas, ns, dt, start, seed,
               save_ps, equilibration_ps, t_read=None):
    """Frames, JS, intact fraction (and L-chirality) of one batched learned-force MD run."""
    sel = model.metadata["particle_selection"]
    t0 = time.perf_counter()
    frames = run_md(model, model.metadata["masses"], n_replicas, ns, dt, start, seed,
                    save_ps=save_ps, equilibration_ps=equilibration_ps, t_read=t_read)
    flat = frames.reshape(-1, len(sel), 3)
    out = {"seconds": time.perf_counter() - t0, "replicas": n_replicas,
           "energy_read_at_t": model.t_min if t_read is None else t_read,
           "ns_per_replica": frames.shape[1] * save_ps / 1000.0 + equilibration_ps / 1000.0,
           "equilibration_ps": equilibration_ps, "frames": int(flat.shape[0]),
           "timestep_fs": dt, "save_ps": save_ps}
    out["ns_total"] = out["ns_per_replica"] * n_replicas
    if not flat.shape[0]:
        return dict(out, js=float("nan"), intact_fraction=0.0)
    out["js"] = js_divergence(ref_pp, phi_psi(flat, ref.topology if kind == "aa" else None,
                                              kind))
    ratio = bond_lengths(flat, bonds) / ref_len.mean(0)
    out["intact_fraction"] = float(((ratio > 0.8) & (ratio < 1.25)).all(1).mean())
    if kind == "aa":
        out["l_chiral_fraction"] = float(is_l_chiral(ref.topology.to_openmm(), flat).mean())
    return out


def evaluate(kind, path, ref, ref_pp, args, rng):
    model = de.load_model(path)
    sel = model.metadata["particle_selection"]
    ref_xyz = ref.xyz[:, sel]
    out = {"t_min": model.t_min}
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    samples = de.sample(model, None, args.samples, steps=args.sde_steps, return_nll=False,
                        seed=args.seed, dtype=torch.float32).x.numpy()
    mdtop = ref.topology if kind == "aa" else None
    if kind == "aa":
        # the reference (and amber MD) is L-alanine; the model also draws D-alanine, which
        # lands on phi > 0. The folded sampler reflects those (exact density q(x) + q(Rx)).
        # Fold before the corrector: the model knows chirality at t_min (a D structure is
        # ~200 kT up), so MALA would relax D samples into its D region, not their mirror.
        top = ref.topology.to_openmm()
        l_chiral = is_l_chiral(top, samples)
        out["aa_l_chiral_fraction_iid"] = float(l_chiral.mean())
        pp_raw = phi_psi(samples, ref.topology, kind)
        out["aa_js_iid_unfolded"] = js_divergence(ref_pp, pp_raw)
        out["aa_js_iid_l_chiral_only"] = js_divergence(ref_pp, pp_raw[l_chiral]) \
            if l_chiral.any() else float("nan")
        if args.fold:
            samples, _ = de.mirror_fold(samples, lambda x: is_l_chiral(top, x))
    # the predictor alone (plain reverse SDE), then the Metropolis corrector at t_min
    out[f"{kind}_js_iid_sde"] = js_divergence(ref_pp, phi_psi(samples, mdtop, kind))
    if args.corrector_steps:
        moved, info = de.mala(model, samples, args.corrector_steps, seed=args.seed)
        samples = moved.numpy()
        out["corrector"] = {k: info[k] for k in ("steps", "step_size", "acceptance", "seconds")}
        if kind == "aa":   # structures far from equilibrium can cross the chirality barrier
            out["aa_l_chiral_fraction_after_corrector"] = float(is_l_chiral(top, samples)
                                                                .mean())
    out["iid_seconds"] = time.perf_counter() - t0
    out["iid_samples"] = args.samples
    bonds = np.array([(b[0].index, b[1].index) for b in ref.topology.bonds]) if kind == "aa" \
        else np.array([(i, i + 1) for i in range(len(sel) - 1)])
    ref_len = bond_lengths(ref_xyz, bonds)
    if kind == "aa":
        from scipy.stats import wasserstein_distance
        s_len = bond_lengths(samples, bonds)
        out["aa_bond_w1_nm"] = float(np.mean([wasserstein_distance(ref_len[:, k], s_len[:, k])
                                              for k in range(len(bonds))]))
    out["iid_sampler"] = "reverse SDE" + (", mirror-folded to L" if kind == "aa" and args.fold
                                          else "") + (
        f", then {args.corrector_steps} MALA corrector steps at t_min" if args.corrector_steps
        else "")
    out[f"{kind}_js_iid"] = js_divergence(ref_pp, phi_psi(samples, mdtop, kind))
    # MD with the exported force, replicas started from reference frames
    dt = 1.0 if kind == "aa" else 2.0
    replicas = args.aa_replicas if kind == "aa" else args.replicas
    ns = args.aa_ns if kind == "aa" else args.cg_ns
    common = (model, ref, ref_pp, bonds, ref_len)
    t_read = args.aa_md_t if kind == "aa" else None
    md = md_quality(kind, *common, replicas, ns, dt,
                    ref_xyz[rng.choice(len(ref_xyz), replicas, replace=False)], args.seed,
                    args.save_ps, args.equilibration_ps, t_read)
    out["md"] = md
    out[f"{kind}_js_md"] = md["js"]
    out[f"{kind}_md_intact_fraction"] = md["intact_fraction"]
    out.update({f"md_{k}": md[k] for k in ("frames", "replicas", "ns_per_replica", "ns_total",
                                           "timestep_fs")})
    if kind == "aa":
        out["aa_l_chiral_fraction_md"] = md["l_chiral_fraction"]
        if args.aa_stability_ns > 0:    # one long replica: stability at 1 fs
            stab = md_quality(kind, *common, 1, args.aa_stability_ns, 1.0,
                              ref_xyz[rng.choice(len(ref_xyz), 1)], args.seed + 1, 1.0, 0.0,
                              t_read)
            out["stability"] = stab
            out["aa_stability_ns"] = stab["ns_total"]
            out["aa_stability_intact_fraction"] = stab["intact_fraction"]
            out["aa_stability_l_chiral_fraction"] = stab["l_chiral_fraction"]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=os.path.join(ROOT, "data", "ala2_vacuum.npz"))
    ap.add_argument("--aa", default=os.path.join(ROOT, "models", "ala2_aa.pt"))
    ap.add_argument("--cg", default=os.path.join(ROOT, "models", "ala2_cg.pt"))
    ap.add_argument("--samples", type=int, default=10000)
    ap.add_argument("--sde-steps", type=int, default=500)
    ap.add_argument("--corrector-steps", type=int, default=100,
                    help="MALA steps on exp(-E(x, t_min)) after the reverse SDE (0: none)")
    ap.add_argument("--replicas", type=int, default=16, help="CG MD replicas")
    ap.add_argument("--cg-ns", type=float, default=0.5, help="CG MD per replica, ns")
    ap.add_argument("--aa-replicas", type=int, default=128, help="all-atom MD replicas")
    ap.add_argument("--aa-ns", type=float, default=0.05,
                    help="all-atom MD per replica after equilibration, ns")
    ap.add_argument("--aa-stability-ns", type=float, default=1.0,
                    help="one more all-atom replica this long at 1 fs, for stability (0: none)")
    ap.add_argument("--aa-md-t", type=float, default=None,
                    help="diffusion time at which the all-atom MD reads the learned energy "
                         "(default: the model's t_min)")
    ap.add_argument("--equilibration-ps", type=float, default=10.0,
                    help="MD discarded at the start of each replica, ps")
    ap.add_argument("--save-ps", type=float, default=0.5, help="MD frame interval, ps")
    ap.add_argument("--no-fold", dest="fold", action="store_false",
                    help="all-atom i.i.d. JS of the raw samples (both enantiomers)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "ala2_quality.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.samples, args.sde_steps, args.replicas, args.aa_replicas = 200, 50, 2, 2
        args.corrector_steps = min(args.corrector_steps, 5)
        args.aa_ns = args.cg_ns = args.aa_stability_ns = 0.005
        args.equilibration_ps = 1.0
    torch.set_num_threads(1)
    ref = load_reference(args.data)
    rng = np.random.default_rng(args.seed)
    res = {"reference_frames": len(ref.xyz), "reference_ns": ref.settings["ns"],
           "settings": {k: v for k, v in vars(args).items() if k not in ("out",)}}
    # finite-sample floor of the JS estimate: the two halves of the reference run
    ref_pp = phi_psi(ref.xyz, ref.topology, "aa")
    half = len(ref_pp) // 2
    res["js_reference_split_half"] = js_divergence(ref_pp[:half], ref_pp[half:])
    print(f"JS between the reference halves ({half} vs {len(ref_pp) - half} frames): "
          f"{res['js_reference_split_half']:.4f}")
    for kind, path in (("aa", args.aa), ("cg", args.cg)):
        r = evaluate(kind, path, ref, ref_pp, args, rng)
        res[kind] = r
        res.update({k: v for k, v in r.items() if k.startswith(kind + "_")})
        print(f"{kind}: " + ", ".join(f"{k} {v:.4g}" for k, v in r.items()
                                      if isinstance(v, (int, float))), flush=True)
    targets = {f"{k}_le_0.05": bool(res[k] <= 0.05)
               for k in ("aa_js_iid", "aa_js_md", "cg_js_iid", "cg_js_md")}
    print("targets:", ", ".join(f"{k}: {'PASS' if v else 'FAIL'}" for k, v in targets.items()))
    write_json(args.out, {"benchmark": "ala2_quality", "quick": args.quick,
                          "hardware": hardware(), "targets": targets, **res})
    print(f"wrote {args.out}")
    return res, targets


if __name__ == "__main__":
    main()
