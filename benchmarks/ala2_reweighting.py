"""Boltzmann reweighting of the all-atom alanine-dipeptide model to amber14 (vacuum, 300 K).

Target: the System the reference data were made with (``alanine_system(top, "vacuum",
constraints=None)``, scripts/generate_ala2_data.py), at the reference temperature.
Amber energies are mirror-symmetric while the reference MD stays L, so the target is
amber restricted to L-chirality. The model draws D-alanine too; those samples get zero
weight. ``--fold`` mirror-folds them into L instead, with the exact density
``q(x) + q(Rx)``; on the shipped model the second solve (the flow ODE started at the
reflection of a sample) blows up, so it is off by default.

1. i.i.d.: ``--n-iid`` samples from the model with their exact flow-ODE ``log q``
   (adaptive dopri5, rtol = atol = 1e-7, in float64 (``--dtype``; float32 steps
   underflowed on one solve in ten), exact divergence by forward-Laplacian propagation,
   ``--divergence fast``), ``log w = -u/kT - log q``.
2. MD: ``--md-replicas`` Langevin runs (1 fs, 1/ps) with the learned force alone, as one
   batch in one Context, started from reference frames, ``--md-ns`` each;
   ``log w = -u/kT + E_theta(x, t_min)``. A blow-up stops the batch; frames so far are kept.
   Both sample sets are first taken one exact probability-flow step on from ``t_min`` to 0
   (``de.denoise``: ``-log q`` gains the step's ``log det J``); the ``t_min`` noise
   otherwise widens the stiffest modes 2-2.6x, which caps the ESS of even a perfect model
   at about 6% (harmonic amber modes; 88% after the step). ``--no-denoise`` skips it.
3. phi free-energy profiles: 36 bins of 10 degrees on (-pi, pi]; RMSE (kT) against the
   reference MD over bins with >= 1% reference population, both profiles aligned by
   their reference-population-weighted mean over those bins. Bins where the reweighted
   samples have no weight at all are counted (``*_missing_bins``) and fail the gate.
4. Energy comparison on ``--n-compare`` reference frames plus as many decoys (the
   native structure with Gaussian noise of 0.002-0.02 nm per coordinate):
   Spearman/Pearson and the OLS slope of E_theta(x, t_min) (kT) regressed on u/kT; the flow-ODE -log p0 on a
   subset (``--n-nll``; RK4 on 200 steps: float32 dopri5 failed on the stiff decoys); heavy-atom RMSD to the native structure (the reference frame
   of lowest amber energy); decoy ranking.
5. Delta F = F_amber - F_learned (kT) by BAR and MBAR over ``--lambdas`` linearly mixed
   states, each simulated ``--bar-ps`` after 1 ps of equilibration.

Writes benchmarks/results/ala2_reweighting.json and PNG plots in
benchmarks/results/ala2_reweighting/.

Usage::

    python benchmarks/ala2_reweighting.py [--model models/ala2_aa.pt] [--quick]
"""
import argparse
import copy
import hashlib
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import hardware, write_json  # noqa: E402


import openmm_diffenergy as de  # noqa: E402
from openmm_diffenergy import plots  # noqa: E402
from openmm_diffenergy.ala2 import load_reference, reference_system  # noqa: E402
from openmm_diffenergy.alanine import is_l_chiral  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BINS = 36                       # 10-degree phi bins
MIN_POPULATION = 0.01


def clean(obj):
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def native_structure(system, xyz):
    """The reference frame of lowest amber energy (deterministic; LocalEnergyMinimizer
    from the built structure ended in different minima from one call to the next)."""
    energies = de.potential_energies(system, xyz)
    return np.asarray(xyz[int(np.argmin(energies))], dtype=np.float64)


def profile_summary(res, ref_profile, label):
    if res is None:
        return {f"phi_fe_rmse_kt_{label}": float("nan"), f"ess_{label}": float("nan")}
    r = de.profile_rmse(res.profiles["phi"], ref_profile, MIN_POPULATION)
    return {f"ess_{label}": res.ess, f"ess_{label}_samples": res.ess * len(res.x),
            f"ess_{label}_floor": 1.0 / len(res.x),     # Kish ESS of one dominant weight
            f"max_weight_{label}": float(res.weights.max()),
            f"phi_fe_rmse_kt_{label}": r["rmse_kt"], f"phi_fe_max_abs_kt_{label}": r["max_abs_kt"],
            f"phi_fe_bins_{label}": r["n_bins"], f"phi_fe_missing_bins_{label}": r["n_missing"],
            f"phi_fe_rmse_kt_{label}_unweighted": de.profile_rmse(
                res.proposal_profiles["phi"], ref_profile, MIN_POPULATION)["rmse_kt"],
            f"l_chiral_fraction_{label}": res.info.get("condition_fraction")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "ala2_aa.pt"))
    ap.add_argument("--data", default=os.path.join(ROOT, "data", "ala2_vacuum.npz"))
    ap.add_argument("--n-iid", type=int, default=256, help="i.i.d. samples")
    ap.add_argument("--divergence", default="fast",
                    help="exact divergence for log q: 'fast' (forward Laplacian, exact; 12.7x the "
                         "autograd loop in divergence_speed.json) or 'exact' (autograd rows)")
    ap.add_argument("--iid-batch", type=int, default=32)
    ap.add_argument("--rtol", type=float, default=1e-7,
                    help="dopri5 rtol = atol (at 1e-5, 3 of 16 batched log q were off by 4-82 "
                         "nats on the shipped model)")
    ap.add_argument("--dtype", choices=["float64", "float32"], default="float64",
                    help="precision of the i.i.d. likelihood solves")
    ap.add_argument("--fold", action="store_true",
                    help="mirror-fold D-alanine samples into L (exact density q(x) + q(Rx), "
                         "one more flow solve per sample) instead of giving them zero weight")
    ap.add_argument("--t-min", type=float, default=None,
                    help="read the model at this time instead of its own t_min (samples, "
                         "learned MD, energies and BAR states)")
    ap.add_argument("--no-denoise", dest="denoise", action="store_false",
                    help="reweight the samples at t_min as they are, instead of taking them "
                         "one exact probability-flow step on to t = 0 (de.denoise)")
    ap.add_argument("--anneal-stages", type=int, default=100,
                    help="annealed importance sampling (de.anneal) from E_theta to amber on "
                         "the same i.i.d. samples and MD frames, reported as *_annealed "
                         "(0: skip)")
    ap.add_argument("--anneal-steps", type=int, default=10, help="MALA steps per stage")
    ap.add_argument("--anneal-step-factor", type=float, default=0.5,
                    help="MALA step, in units of sigma(t_min)^2 / alpha(t_min)^2")
    ap.add_argument("--anneal-stride", type=int, default=4,
                    help="anneal every this many MD frames (0.4 ps apart at the defaults)")
    ap.add_argument("--md-replicas", type=int, default=32,
                    help="learned-MD replicas, run as a batch in one Context")
    ap.add_argument("--md-ns", type=float, default=0.02, help="learned MD per replica, ns")
    ap.add_argument("--md-save-ps", type=float, default=0.1)
    ap.add_argument("--n-compare", type=int, default=200,
                    help="reference frames (and as many decoys) for the energy comparison")
    ap.add_argument("--n-nll", type=int, default=64, help="structures for the ODE -log p0")
    ap.add_argument("--lambdas", type=int, default=6)
    ap.add_argument("--bar-ps", type=float, default=5.0, help="production per lambda state")
    ap.add_argument("--bar-save-ps", type=float, default=0.05)
    ap.add_argument("--n-bootstrap", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "ala2_reweighting.json"))
    ap.add_argument("--plots", default=os.path.join(HERE, "results", "ala2_reweighting"))
    args = ap.parse_args(argv)
    if args.quick:
        args.n_iid, args.iid_batch, args.md_replicas, args.md_ns = 8, 8, 2, 0.002
        args.n_compare, args.n_nll, args.lambdas, args.bar_ps = 20, 4, 3, 0.2
        args.n_bootstrap, args.anneal_stages, args.anneal_steps = 10, 4, 2
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    ref = load_reference(args.data)
    temperature = float(ref.settings.get("temperature", 300.0))
    top = ref.topology.to_openmm()
    system = reference_system(ref)
    with open(args.model, "rb") as fh:
        model_sha256 = hashlib.sha256(fh.read()).hexdigest()
    model = de.load_model(args.model, n_particles=system.getNumParticles())
    if args.t_min is not None:
        model.t_min = float(args.t_min)
    l_chiral = lambda x: is_l_chiral(top, x)  # noqa: E731
    ref_phi = de.collective_variable(ref.xyz, "phi", top)
    ref_psi = de.collective_variable(ref.xyz, "psi", top)
    ref_profile = de.free_energy_profile(ref_phi, bins=BINS, range=(-np.pi, np.pi),
                                         temperature=temperature, n_bootstrap=args.n_bootstrap,
                                         block_size=50, seed=args.seed)
    out = {"benchmark": "ala2_reweighting", "quick": args.quick, "hardware": hardware(),
           "model": os.path.relpath(os.path.abspath(args.model), ROOT),
           "model_sha256": model_sha256,
           "model_t_min": model.t_min, "temperature_K": temperature,
           "target": "amber14-all vacuum, no constraints, NoCutoff, restricted to L-chirality",
           "reference_frames": int(len(ref.xyz)), "phi_bins": BINS,
           "phi_rmse_population_cutoff": MIN_POPULATION,
           "phi_rmse_alignment": "reference-population-weighted mean over compared bins",
           "denoise": args.denoise,
           "settings": {k: v for k, v in vars(args).items() if k not in ("out", "plots")}}
    timings = {}

    # 1. i.i.d. reweighting -----------------------------------------------------------
    t0 = time.perf_counter()
    iid = iid_ais = None
    anneal = dict(anneal_stages=args.anneal_stages, anneal_steps=args.anneal_steps,
                  anneal_step_size=args.anneal_step_factor * de.mcmc.default_step_size(
                      model.sde, model.t_min))
    common = dict(temperature=temperature, topology=top, bins=BINS,
                  n_bootstrap=args.n_bootstrap, seed=args.seed, condition=l_chiral,
                  progress=True)
    iid_kw = dict(rtol=args.rtol, atol=args.rtol, batch_size=args.iid_batch,
                  divergence=args.divergence, fold=args.fold,
                  dtype=getattr(torch, args.dtype), **common)
    try:
        flow_model = copy.deepcopy(model).to(getattr(torch, args.dtype))
        draws = de.sample_with_likelihood(flow_model, args.n_iid, rtol=args.rtol,
                                          atol=args.rtol, divergence=args.divergence,
                                          batch_size=args.iid_batch, seed=args.seed,
                                          progress=True)
        samples = (draws.x.detach().double().numpy(), draws.nll.detach().double().numpy())
        out["iid_sampler_failures"] = draws.method.get("failures", [])
        out["iid_sampler_nfe"] = draws.method["nfe"]
        timings["iid_sampling_seconds"] = time.perf_counter() - t0
        iid = de.reweight_iid(model, system, samples=samples, denoise=args.denoise,
                              **iid_kw)
        out["n_iid"] = len(iid.x)
        out["iid_fold"] = args.fold
        out["iid_mirrored"] = iid.info.get("mirrored", 0)
        out["iid_density_failures"] = iid.info.get("density_failures", [])
        out["n_iid_dropped"] = iid.info["n_dropped"]
        out["iid_denoise_failed"] = iid.info.get("denoise_failed", 0)
        if args.anneal_stages:
            t1 = time.perf_counter()
            iid_ais = de.reweight_iid(model, system, samples=samples, **anneal, **iid_kw)
            out["n_iid_annealed"] = len(iid_ais.x)
            out["iid_annealing_acceptance"] = iid_ais.info["annealing"]["mean_acceptance"]
            timings["iid_annealing_seconds"] = time.perf_counter() - t1
    except Exception as err:     # a bad model must not stop the benchmark
        out["iid_error"] = f"{type(err).__name__}: {err}"
        out["n_iid"] = 0
    out.update(profile_summary(iid, ref_profile, "iid"))
    if args.anneal_stages:
        out.update(profile_summary(iid_ais, ref_profile, "iid_annealed"))
    timings["iid_seconds"] = time.perf_counter() - t0
    print(f"iid: ESS {out['ess_iid']}, phi RMSE {out['phi_fe_rmse_kt_iid']} kT; annealed: "
          f"ESS {out.get('ess_iid_annealed')}, phi RMSE "
          f"{out.get('phi_fe_rmse_kt_iid_annealed')} kT ({timings['iid_seconds']:.0f} s)",
          flush=True)

    # 2. MD reweighting -----------------------------------------------------------------
    t0 = time.perf_counter()
    md = md_ais = None
    n_frames = max(1, int(round(args.md_ns * 1000 / args.md_save_ps)))
    starts = ref.xyz[rng.choice(len(ref.xyz), args.md_replicas, replace=False)]
    try:
        runs = de.run_learned_md(model, system, starts, temperature=temperature,
                                 n_frames=n_frames, save_interval=args.md_save_ps,
                                 timestep=0.001, n_replicas=args.md_replicas, seed=args.seed,
                                 progress=True)
        out["md_replicas"] = [{"frames": len(r["frames"]), "stopped": r["stopped"]}
                              for r in runs]
        frames = np.concatenate([r["frames"] for r in runs])    # replica after replica
        timings["md_run_seconds"] = time.perf_counter() - t0
        md = de.reweight_md(model, system, frames=frames, block_size=10,
                            denoise=args.denoise, **common)
        out["n_md"] = len(md.x)
        out["md_denoise_failed"] = md.info.get("denoise_failed", 0)
        bonds = np.array([(b[0].index, b[1].index) for b in ref.topology.bonds])
        ref_len = np.linalg.norm(ref.xyz[:, bonds[:, 0]] - ref.xyz[:, bonds[:, 1]], axis=-1)
        md_len = np.linalg.norm(md.x[:, bonds[:, 0]] - md.x[:, bonds[:, 1]], axis=-1)
        ratio = md_len / ref_len.mean(0)
        out["md_intact_fraction"] = float(((ratio > 0.8) & (ratio < 1.25)).all(1).mean())
        if args.anneal_stages:
            t1 = time.perf_counter()
            md_ais = de.reweight_md(model, system, frames=frames[::args.anneal_stride],
                                    block_size=max(1, 10 // args.anneal_stride), **anneal,
                                    **common)
            out["n_md_annealed"] = len(md_ais.x)
            out["md_annealing_acceptance"] = md_ais.info["annealing"]["mean_acceptance"]
            timings["md_annealing_seconds"] = time.perf_counter() - t1
    except Exception as err:
        out["md_error"] = f"{type(err).__name__}: {err}"
        out["n_md"] = 0
    out["n_md_requested"] = n_frames * args.md_replicas
    out["md_ns_per_replica"] = args.md_ns
    out.update(profile_summary(md, ref_profile, "md"))
    timings["md_seconds"] = time.perf_counter() - t0
    if args.anneal_stages:
        out.update(profile_summary(md_ais, ref_profile, "md_annealed"))
    print(f"md: ESS {out['ess_md']}, phi RMSE {out['phi_fe_rmse_kt_md']} kT, "
          f"{out['n_md']} frames; annealed: ESS {out.get('ess_md_annealed')}, phi RMSE "
          f"{out.get('phi_fe_rmse_kt_md_annealed')} kT ({timings['md_seconds']:.0f} s)",
          flush=True)

    # 3. energy comparison ------------------------------------------------------------
    t0 = time.perf_counter()
    native = native_structure(system, ref.xyz)
    heavy = [a.index for a in ref.topology.atoms if a.element.symbol != "H"]
    eq = ref.xyz[rng.choice(len(ref.xyz), args.n_compare, replace=False)].astype(np.float64)
    sigma = rng.uniform(0.002, 0.02, args.n_compare)[:, None, None]
    decoys = native[None] + sigma * rng.normal(size=eq.shape)
    structures = np.concatenate([eq, decoys])
    cmp_all = de.compare_energies(model, system, structures, temperature, reference=native,
                                  atom_indices=heavy)
    cmp_eq = de.compare_energies(model, system, eq, temperature)
    pick = np.concatenate([np.arange(args.n_nll // 2),
                           args.n_compare + np.arange(args.n_nll - args.n_nll // 2)])
    try:
        cmp_nll = de.compare_energies(model, system, structures[pick], temperature,
                                      reference=native, atom_indices=heavy, nll=True,
                                      nll_options={"solver": "rk4", "steps": 200,
                                                   "divergence": args.divergence,
                                                   "progress": True})
        nll_corr = cmp_nll.nll_vs_classical or {}
        nll_cmp = {"spearman_nll_vs_classical": nll_corr.get("spearman", float("nan")),
                   "slope_nll_vs_classical_kt": nll_corr.get("slope", float("nan")),
                   "n_nll_failed": cmp_nll.info["nll_failed"],
                   "spearman_learned_vs_classical_nll_subset":
                       cmp_nll.learned_vs_classical["spearman"],
                   "decoy_ranking_nll_subset": cmp_nll.ranking.get("nll")}
    except Exception as err:
        nll_cmp = {"spearman_nll_vs_classical": float("nan"),
                   "nll_error": f"{type(err).__name__}: {err}"}
    lc = cmp_all.learned_vs_classical
    out.update({"spearman_learned_vs_classical": lc["spearman"],
                "pearson_learned_vs_classical": lc["pearson"],
                "slope_learned_vs_classical_kt": lc["slope"],
                "slope_learned_vs_classical_kt_stderr": lc["slope_stderr"],
                "slope_regression": "E_theta(x, t_min) [kT] regressed on u/kT (OLS)",
                "n_compare": int(len(structures)), "n_compare_equilibrium": int(len(eq)),
                "spearman_learned_vs_classical_equilibrium":
                    cmp_eq.learned_vs_classical["spearman"],
                "slope_learned_vs_classical_kt_equilibrium":
                    cmp_eq.learned_vs_classical["slope"],
                "n_nll": int(len(pick)), **nll_cmp,
                "decoy_ranking_learned": cmp_all.ranking["learned"],
                "decoy_ranking_classical": cmp_all.ranking["classical"]})
    timings["compare_seconds"] = time.perf_counter() - t0
    print(f"compare: Spearman {lc['spearman']:.3f}, slope {lc['slope']:.3f} kT/kT "
          f"({timings['compare_seconds']:.0f} s)", flush=True)

    # 4. BAR / MBAR learned -> amber --------------------------------------------------
    t0 = time.perf_counter()
    n_bar = max(2, int(round(args.bar_ps / args.bar_save_ps)))
    try:
        dfe = de.lambda_free_energy(model, system, ref.xyz[0],
                                    lambdas=np.linspace(0, 1, args.lambdas),
                                    temperature=temperature, n_frames=n_bar,
                                    save_interval=args.bar_save_ps, timestep=0.001,
                                    equilibration=1.0, seed=args.seed, progress=True)
        out.update({"delta_f_bar_kt": dfe.delta_f_bar_kt,
                    "delta_f_bar_kt_uncertainty": dfe.error_bar_kt,
                    "delta_f_mbar_kt": dfe.delta_f_kt,
                    "delta_f_mbar_kt_uncertainty": dfe.error_kt,
                    "delta_f_definition": "F_amber - F_learned = -ln(Z_amber / Z_learned), "
                                          "Z_learned = int exp(-E_theta(x/s, t_min)) dx",
                    "bar_min_neighbour_overlap": min(dfe.info.get("neighbour_overlap",
                                                                  [float("nan")])),
                    "bar_steps_kt": dfe.info.get("bar_steps_kt"),
                    "bar_n_k": dfe.n_k.tolist(), "bar_states": dfe.info["states"],
                    "bar_frames_per_state": n_bar,
                    "bar_errors": {k: v for k, v in dfe.info.items() if k.endswith("_error")}})
    except Exception as err:
        out.update({"delta_f_bar_kt": float("nan"), "delta_f_bar_kt_uncertainty": float("nan"),
                    "bar_error": f"{type(err).__name__}: {err}"})
    timings["bar_seconds"] = time.perf_counter() - t0
    print(f"BAR: dF {out['delta_f_bar_kt']} +- {out['delta_f_bar_kt_uncertainty']} kT "
          f"({timings['bar_seconds']:.0f} s)", flush=True)

    # 5. plots ------------------------------------------------------------------------
    os.makedirs(args.plots, exist_ok=True)
    profs = {"reference MD": ref_profile}
    rama = {"reference MD": (ref_phi, ref_psi)}
    for label, res in (("i.i.d.", iid), ("learned MD", md)):
        if res is not None:
            profs[f"{label} reweighted"] = res.profiles["phi"]
            profs[f"{label} unweighted"] = res.proposal_profiles["phi"]
            rama[f"{label} reweighted"] = (res.cvs["phi"], res.cvs["psi"], res.weights)
    for label, res in (("i.i.d.", iid_ais), ("learned MD", md_ais)):
        if res is not None:
            profs[f"{label} annealed"] = res.profiles["phi"]
            rama[f"{label} annealed"] = (res.cvs["phi"], res.cvs["psi"], res.weights)
    plots.plot_free_energy_profiles(profs, os.path.join(args.plots, "phi_profiles.png"),
                                    xlabel="phi (rad)", ymax=15.0,
                                    title="alanine dipeptide, 300 K (clipped at 15 kT)")
    plots.plot_ramachandran(rama, os.path.join(args.plots, "ramachandran.png"))
    plots.plot_energy_scatter(cmp_all.reduced_classical, cmp_all.learned_kt,
                              os.path.join(args.plots, "energy_scatter.png"), fit=lc)
    plots.plot_funnel(cmp_all.rmsd_nm, {"learned E_theta": cmp_all.learned_kt,
                                        "amber u/kT": cmp_all.reduced_classical},
                      os.path.join(args.plots, "funnel.png"))

    gates = {"ess_iid_ge_0.01": bool(out["ess_iid"] >= 0.01),
             "phi_fe_rmse_kt_iid_le_0.5": bool(out["phi_fe_rmse_kt_iid"] <= 0.5
                                               and out.get("phi_fe_missing_bins_iid", 1) == 0),
             "phi_fe_rmse_kt_md_le_0.5": bool(out["phi_fe_rmse_kt_md"] <= 0.5
                                              and out.get("phi_fe_missing_bins_md", 1) == 0),
             "spearman_learned_vs_classical_ge_0.8":
                 bool(out["spearman_learned_vs_classical"] >= 0.8)}
    timings["total_seconds"] = time.perf_counter() - t_start
    out["gates"] = gates
    if args.anneal_stages:
        # the same thresholds on the annealed estimators (not the definition of
        # the MD weights, which is the direct log w = -u/kT + E_theta)
        out["gates_annealed"] = {
            f"phi_fe_rmse_kt_{label}_annealed_le_0.5": bool(
                out[f"phi_fe_rmse_kt_{label}_annealed"] <= 0.5
                and out.get(f"phi_fe_missing_bins_{label}_annealed", 1) == 0)
            for label in ("iid", "md")}
        out["gates_annealed"]["ess_iid_annealed_ge_0.01"] = bool(
            out["ess_iid_annealed"] >= 0.01)
    out["timings"] = timings
    for name in ("gates", "gates_annealed"):
        if name in out:
            print(f"{name}:", ", ".join(f"{k}: {'PASS' if v else 'FAIL'}"
                                        for k, v in out[name].items()))
    write_json(args.out, clean(out))
    print(f"wrote {args.out} ({timings['total_seconds']:.0f} s)")
    return out


if __name__ == "__main__":
    main()
