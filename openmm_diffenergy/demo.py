"""The alanine-dipeptide demo: the shipped all-atom model as physics, end to end.

1. OpenMM Langevin MD driven by the learned force alone (replicas started from reference
   frames), reweighted to amber14 with ``log w = -u/kT + E_theta(x, t_min)``;
2. i.i.d. samples from the model with their exact ``-log p0`` (probability-flow ODE, RK4 on
   200 steps packed toward ``t_min``, exact divergence by forward-Laplacian propagation),
   reweighted with ``log w = -u/kT - log q``; both sets are first taken one exact
   probability-flow step on from ``t_min`` to 0 (``denoise``), which removes most of the
   ``t_min`` noise from the bonds;
3. the phi/psi Jensen-Shannon divergence of both sample sets against the reference MD;
4. learned ``E_theta(x, t_min)`` against amber ``u/kT`` on reference frames and decoys.

The target is the System the reference data were made with (amber14, vacuum, no
constraints), restricted to L-chirality like the reference MD (amber is mirror-symmetric).
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

__all__ = ["run_demo", "DEFAULT_MODEL", "DEFAULT_DATA"]

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.join(_ROOT, "models", "ala2_aa.pt")
DEFAULT_DATA = os.path.join(_ROOT, "data", "ala2_vacuum.npz")


def run_demo(out_dir: str = "outputs/demo", model: str = DEFAULT_MODEL,
             data: str = DEFAULT_DATA, n_iid: int = 128, md_ps: float = 20.0,
             replicas: int = 4, n_compare: int = 100, anneal_stages: int = 50, seed: int = 0,
             progress: bool = True, log=print) -> dict:
    """Run the demo and write its trajectory, plots and a JSON summary to ``out_dir``.

    Parameters
    ----------
    out_dir : str
        Output folder: ``learned_md.dcd`` (+ ``learned_md.pdb``), ``summary.json`` and
        PNG plots.
    model : str
        All-atom (22-atom) alanine-dipeptide model file.
    data : str
        Reference MD (``.npz`` from ``diffenergy generate-data``).
    n_iid : int
        i.i.d. samples with exact likelihoods.
    md_ps : float
        Learned-force MD per replica, ps (1 fs steps, a frame every 0.1 ps).
    replicas : int
    n_compare : int
        Reference frames (and as many decoys) in the energy comparison.
    anneal_stages : int
        Stages of the annealed importance sampling of every second MD frame to amber.
    seed : int
    progress : bool
    log : callable
        Receives the progress and result lines.

    Returns
    -------
    dict
        The summary also written to ``summary.json``.
    """
    import mdtraj

    from . import plots
    from .ala2 import load_reference, phi_psi, phi_psi_js, reference_system
    from .alanine import is_l_chiral
    from .compare import compare_energies
    from .io import atomic_write, load_model
    from .mcmc import default_step_size
    from .reweighting import profile_rmse, reweight_iid, reweight_md, run_learned_md

    for name, value in (("n_iid", n_iid), ("replicas", replicas), ("n_compare", n_compare),
                        ("anneal_stages", anneal_stages)):
        if int(value) < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if not md_ps > 0:
        raise ValueError(f"md_ps must be positive, got {md_ps}")
    start = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    ref = load_reference(data)
    top = ref.topology.to_openmm()
    temperature = float(ref.settings.get("temperature", 300.0))
    system = reference_system(ref)
    net = load_model(model, n_particles=system.getNumParticles())
    l_chiral = lambda x: is_l_chiral(top, x)  # noqa: E731
    common = dict(temperature=temperature, topology=top, condition=l_chiral, seed=seed,
                  progress=progress, n_bootstrap=20)
    ref_pp = phi_psi(ref.xyz, ref.topology)
    summary = {"model": os.path.abspath(model), "temperature_K": temperature,
               "target": "amber14 vacuum (the reference System), L-chiral"}

    log(f"[1/4] learned-force MD: {replicas} replicas x {md_ps:g} ps at 1 fs")
    t0 = time.perf_counter()
    starts = ref.xyz[rng.choice(len(ref.xyz), replicas, replace=False)]
    runs = run_learned_md(net, system, starts, temperature=temperature,
                          n_frames=max(1, int(round(md_ps * 10))), save_interval=0.1,
                          timestep=0.001, n_replicas=replicas, seed=seed, progress=progress)
    frames = np.concatenate([r["frames"] for r in runs])       # replica after replica
    if len(frames) == 0:
        raise RuntimeError("the learned-force MD stopped before its first frame: "
                           + "; ".join(str(r["stopped"]) for r in runs))
    traj = mdtraj.Trajectory(frames.astype(np.float32), ref.topology)
    traj[0].save_pdb(os.path.join(out_dir, "learned_md.pdb"))
    traj.save_dcd(os.path.join(out_dir, "learned_md.dcd"))
    md = reweight_md(net, system, frames=frames, block_size=10, denoise=True, **common)
    ref_profile = _reference_profile(ref_pp[:, 0], temperature)
    summary.update(md_frames=int(len(md.x)), md_ps_per_replica=md_ps, ess_md=md.ess,
                   phi_rmse_kt_md=profile_rmse(md.profiles["phi"], ref_profile)["rmse_kt"],
                   js_md=phi_psi_js(ref_pp, _cv_pairs(md)),
                   md_seconds=time.perf_counter() - t0)

    log(f"[1b] annealed importance sampling of every 2nd MD frame to amber ({anneal_stages} "
        "stages x 10 MALA steps)")
    t0 = time.perf_counter()
    step = 0.5 * default_step_size(net.sde, net.t_min)
    ais = reweight_md(net, system, frames=frames[::2], block_size=5,
                      anneal_stages=anneal_stages, anneal_step_size=step, **common)
    summary.update(md_frames_annealed=int(len(ais.x)), ess_md_annealed=ais.ess,
                   phi_rmse_kt_md_annealed=profile_rmse(ais.profiles["phi"],
                                                        ref_profile)["rmse_kt"],
                   annealing_acceptance=ais.info["annealing"]["mean_acceptance"],
                   annealing_seconds=time.perf_counter() - t0)

    log(f"[2/4] {n_iid} i.i.d. samples with exact -log p0 (flow ODE, RK4, exact divergence by "
        "forward Laplacian)")
    t0 = time.perf_counter()
    iid = reweight_iid(net, system, n=n_iid, divergence="fast", solver="rk4", steps=200,
                       batch_size=64, denoise=True, **common)
    iid_pp = _cv_pairs(iid)
    summary.update(n_iid=int(len(iid.x)), ess_iid=iid.ess,
                   l_chiral_fraction_iid=iid.info.get("condition_fraction"),
                   js_iid=phi_psi_js(ref_pp, iid_pp),
                   nll_mean_nats=float(np.mean(iid.proposal)),
                   iid_seconds=time.perf_counter() - t0)

    log(f"[3/4] learned vs amber energies on {n_compare} reference frames and {n_compare} "
        "decoys")
    t0 = time.perf_counter()
    eq = ref.xyz[rng.choice(len(ref.xyz), n_compare, replace=False)].astype(np.float64)
    native = eq[0]
    decoys = native[None] + rng.uniform(0.002, 0.02, (n_compare, 1, 1)) * rng.normal(
        size=eq.shape)
    heavy = [a.index for a in ref.topology.atoms if a.element.symbol != "H"]
    cmp = compare_energies(net, system, np.concatenate([eq, decoys]), temperature,
                           reference=native, atom_indices=heavy)
    corr = cmp.learned_vs_classical
    summary.update(spearman_learned_vs_classical=corr["spearman"],
                   pearson_learned_vs_classical=corr["pearson"],
                   slope_learned_vs_classical_kt=corr["slope"],
                   compare_seconds=time.perf_counter() - t0)

    log("[4/4] plots")
    plots.plot_ramachandran({"reference MD (amber14)": (ref_pp[:, 0], ref_pp[:, 1]),
                             "learned-force MD": (md.cvs["phi"], md.cvs["psi"]),
                             "i.i.d. samples": (iid_pp[:, 0], iid_pp[:, 1])},
                            os.path.join(out_dir, "ramachandran.png"))
    plots.plot_free_energy_profiles(
        {"reference MD": ref_profile, "learned MD, reweighted": md.profiles["phi"],
         "learned MD, annealed": ais.profiles["phi"],
         "i.i.d., reweighted": iid.profiles["phi"]},
        os.path.join(out_dir, "phi_profiles.png"), xlabel="phi (rad)", ymax=15.0)
    plots.plot_energy_scatter(cmp.reduced_classical, cmp.learned_kt,
                              os.path.join(out_dir, "energy_scatter.png"), fit=corr)
    plots.plot_funnel(cmp.rmsd_nm, {"learned E_theta": cmp.learned_kt,
                                    "amber u/kT": cmp.reduced_classical},
                      os.path.join(out_dir, "funnel.png"))
    summary["seconds"] = time.perf_counter() - start
    summary = {k: (float(v) if isinstance(v, (np.floating, float)) else v)
               for k, v in summary.items()}
    with atomic_write(os.path.join(out_dir, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=1, allow_nan=True)
    log(f"ESS (Kish, fraction): i.i.d. {summary['ess_iid']:.4f} of {summary['n_iid']}, "
        f"learned MD {summary['ess_md']:.4f} of {summary['md_frames']} frames, annealed "
        f"{summary['ess_md_annealed']:.4f} of {summary['md_frames_annealed']}")
    log(f"phi free-energy RMSE vs reference MD: learned MD {summary['phi_rmse_kt_md']:.2f} kT, "
        f"annealed {summary['phi_rmse_kt_md_annealed']:.2f} kT (bins >= 1% populated)")
    log(f"phi/psi JS divergence vs reference MD: i.i.d. {summary['js_iid']:.3f}, "
        f"learned MD {summary['js_md']:.3f} (nats, 64 x 64 bins)")
    log(f"learned vs amber: Spearman {corr['spearman']:.3f}, Pearson {corr['pearson']:.3f}, "
        f"slope {corr['slope']:.3f} kT per kT")
    log(f"wrote {out_dir}/ (learned_md.dcd, summary.json, 4 PNG) in {summary['seconds']:.0f} s")
    return summary


def _cv_pairs(result):
    """(phi, psi) in radians, shape (n, 2), as the reweighting already computed them."""
    return np.stack([result.cvs["phi"], result.cvs["psi"]], 1)


def _reference_profile(phi, temperature):
    from .reweighting import free_energy_profile

    return free_energy_profile(phi, bins=36, range=(-np.pi, np.pi), temperature=temperature,
                               n_bootstrap=20, block_size=50)
