"""``diffenergy demo``, ``sample``, ``reweight`` and ``compare``: the analysis subcommands.

Registered into :mod:`openmm_diffenergy.cli` when it is imported; kept apart so each
module stays small. The reweighting target is a classical System: an OpenMM System XML
(``--system``) or force-field files applied to the structure (``--forcefield``, default
amber14 in vacuum, no cutoff, no constraints: the System of the shipped reference data).
"""
from __future__ import annotations

import json
import os

from .cli import (Command, _add_output_arguments, _existing_file, _figure, _load_model,
                  _model_temperature, _nonnegative_int, _png_path, _ramachandran,
                  _save_trajectory, _set_threads, _stem, _write_text, alanine_dihedrals,
                  load_structures, particle_mapping, positive_float, positive_int, register,
                  structure_for_model)

__all__: list = []


# ----------------------------------------------------------------------------- shared

def _add_target_arguments(p) -> None:
    p.add_argument("--system", default=None,
                   help="classical target as an OpenMM System XML (same atoms and order as "
                        "the model)")
    p.add_argument("--forcefield", nargs="+", default=None,
                   help="classical target from OpenMM force-field files applied to the "
                        "structure (NoCutoff, no constraints); default amber14-all.xml")
    p.add_argument("--structure", default=None,
                   help="structure (PDB or any mdtraj format) giving the topology; default "
                        "the model's own (alanine dipeptide for the shipped models)")
    p.add_argument("--top", default=None, help="topology (PDB) for DCD/XTC files")
    p.add_argument("--temperature", type=positive_float, default=None,
                   help="K (default: the model's training temperature, else 300)")
    p.add_argument("--chirality", choices=["L", "none"], default="none",
                   help="L: restrict the target to L-alanine (amber is mirror-symmetric, MD "
                        "never inverts a centre); needs an alanine residue")


def _target(args, model):
    """(System, mdtraj structure, temperature K, condition or None) from the options."""
    from openmm import app

    traj = structure_for_model(model, args.structure, args.top)
    if args.system and args.forcefield:
        raise ValueError("give --system or --forcefield, not both")
    if args.system:
        from .serialization import deserialize_system

        if not os.path.isfile(args.system):
            raise FileNotFoundError(f"no such file: {args.system}")
        with open(args.system) as fh:
            system = deserialize_system(fh.read())
    else:
        ff = app.ForceField(*(args.forcefield or ["amber14-all.xml"]))
        system = ff.createSystem(traj.topology.to_openmm(), nonbondedMethod=app.NoCutoff,
                                 constraints=None)
    if system.getNumParticles() != traj.n_atoms:
        raise ValueError(f"the target System has {system.getNumParticles()} particles but the "
                         f"structure has {traj.n_atoms} atoms")
    condition = None
    if args.chirality == "L":
        from .alanine import is_l_chiral

        top = traj.topology.to_openmm()
        is_l_chiral(top, traj.xyz[:1])            # fails now if there is no alanine
        condition = lambda x: is_l_chiral(top, x)  # noqa: E731
    return system, traj, _model_temperature(model, args.temperature), condition


def _has_phi_psi(traj) -> bool:
    """Whether the structure has exactly one phi and one psi (a dipeptide)."""
    import mdtraj

    return (mdtraj.compute_phi(traj[:1])[0].shape[0] == 1
            and mdtraj.compute_psi(traj[:1])[0].shape[0] == 1)


def _write_rows(path: str, columns: dict, extra: dict) -> None:
    if path.lower().endswith(".json"):
        _write_text(path, json.dumps({**extra, **columns}, indent=1) + "\n")
        return
    names = list(columns)
    rows = [",".join(names)] + [",".join(f"{v:.10g}" if isinstance(v, float) else str(v)
                                         for v in row) for row in zip(*columns.values())]
    _write_text(path, "\n".join(rows) + "\n")


def _start(args):
    """Check ``--out``, set the torch threads and load the model."""
    if not args.out.lower().endswith((".csv", ".json")):
        raise ValueError(f"--out {args.out}: results are written as .csv or .json")
    _set_threads(args.threads)
    return _load_model(args.model)


# ----------------------------------------------------------------------------- demo

def _demo_arguments(p) -> None:
    from .demo import DEFAULT_DATA, DEFAULT_MODEL

    p.add_argument("--out-dir", default="outputs/demo",
                   help="folder for the trajectory, plots and summary.json")
    p.add_argument("--model", type=_existing_file, default=DEFAULT_MODEL,
                   help="all-atom alanine-dipeptide model")
    p.add_argument("--data", type=_existing_file, default=DEFAULT_DATA,
                   help="reference MD (.npz from generate-data)")
    p.add_argument("--n-iid", type=positive_int, default=128,
                   help="i.i.d. samples with exact -log p0")
    p.add_argument("--md-ps", type=positive_float, default=20.0,
                   help="learned-force MD per replica, ps (1 fs steps)")
    p.add_argument("--replicas", type=positive_int, default=4, help="MD replicas")
    p.add_argument("--n-compare", type=positive_int, default=100,
                   help="reference frames (and as many decoys) for the energy comparison")
    p.add_argument("--anneal-stages", type=positive_int, default=50,
                   help="stages of the annealed importance sampling of the MD frames")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _demo_run(args) -> int:
    from .demo import run_demo

    _set_threads(args.threads)
    run_demo(args.out_dir, model=args.model, data=args.data, n_iid=args.n_iid,
             md_ps=args.md_ps, replicas=args.replicas, n_compare=args.n_compare,
             anneal_stages=args.anneal_stages, seed=args.seed, progress=not args.no_progress)
    return 0


# ----------------------------------------------------------------------------- sample

def _sample_arguments(p) -> None:
    p.add_argument("model", type=_existing_file, help="model file (.pt)")
    p.add_argument("--n", type=positive_int, default=100, help="number of samples")
    p.add_argument("--steps", type=positive_int, default=500,
                   help="reverse-SDE (Euler-Maruyama) steps from T to t_min")
    p.add_argument("--corrector-steps", type=_nonnegative_int, default=100,
                   help="Metropolis-adjusted Langevin steps on exp(-E(x, t_min)) after the "
                        "reverse SDE (0: none)")
    p.add_argument("--corrector-step-size", type=positive_float, default=None,
                   help="Langevin step in model units^2 (default sigma(t_min)^2 / "
                        "alpha(t_min)^2)")
    p.add_argument("--chirality", choices=["L", "none"], default="none",
                   help="L: mirror-fold D samples into L (exact density q(x) + q(Rx)) before "
                        "the corrector; needs an alanine residue among the model's particles")
    p.add_argument("--structure", default=None,
                   help="structure giving the topology; default the model's own")
    p.add_argument("--top", default=None, help="topology (PDB) for a DCD/XTC --structure")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="precision of the sampler")
    p.add_argument("--seed", type=int, default=0, help="prior draw, path noise, corrector")
    _add_output_arguments(p, "samples.dcd",
                          "samples (.dcd, .xtc, .pdb, .h5) of the model's particles; also "
                          "writes <stem>.pdb (topology) for .dcd/.xtc and <stem>.csv (the "
                          "learned energy of each sample)",
                          "the phi/psi of the samples (alanine dipeptide)")


def _sample_run(args) -> int:
    import numpy as np
    import torch

    from .flow import mirror_fold
    from .likelihood import sample
    from .mcmc import check_settings, mala

    _set_threads(args.threads)
    model = _load_model(args.model)
    traj = structure_for_model(model, args.structure, args.top)
    topology = particle_mapping(model, traj.topology).topology
    condition = None
    if args.chirality == "L":
        from .alanine import is_l_chiral

        try:
            is_l_chiral(topology, np.zeros((1, model.n_particles, 3)))
        except ValueError as err:
            raise ValueError(f"--chirality L needs the alanine N, CA, CB and C among the "
                             f"model's {model.n_particles} particles ({err})") from None
        condition = lambda x: is_l_chiral(topology, x)  # noqa: E731
    # fold before the corrector: a model that knows chirality would relax D samples into
    # its own (high-energy) D region, not into the mirror image of its L basins
    check_settings(model.sde, model.t_min, args.corrector_steps, args.corrector_step_size,
                   ("--corrector-steps", "--corrector-step-size"))
    res = sample(model, None, args.n, steps=args.steps, return_nll=False, seed=args.seed,
                 dtype=getattr(torch, args.dtype), progress=not args.no_progress)
    xyz = res.x.numpy()
    if not np.isfinite(xyz).all():
        bad = int((~np.isfinite(xyz).reshape(len(xyz), -1).all(1)).sum())
        raise RuntimeError(f"{bad} of {len(xyz)} samples are not finite; try more --steps")
    mirrored = np.zeros(len(xyz), dtype=bool)
    if condition is not None:
        xyz, mirrored = mirror_fold(xyz, condition)
    info = dict(res.method)
    if args.corrector_steps:
        moved, mc = mala(model, torch.as_tensor(xyz, dtype=res.x.dtype), args.corrector_steps,
                         args.corrector_step_size, seed=args.seed,
                         progress=not args.no_progress)
        xyz = moved.numpy()
        info.update(corrector_steps=mc["steps"], corrector_step_size=mc["step_size"],
                    corrector_acceptance=mc["acceptance"],
                    seconds=info["seconds"] + mc["seconds"])
    with torch.no_grad():
        y = model.to_model_coordinates(torch.as_tensor(xyz, dtype=res.x.dtype))
        energy = model(y, torch.full((len(y),), res.method["t_min"], dtype=y.dtype))
    for path in _save_trajectory(args.out, topology, xyz.astype(np.float32)):
        print(f"wrote {path}")
    stem = _stem(args.out)
    rows = ["sample,energy_kT,mirrored"] + [
        f"{k},{e:.6f},{int(m)}" for k, (e, m) in enumerate(zip(energy.double().tolist(),
                                                              mirrored))]
    _write_text(stem + ".csv", "\n".join(rows) + "\n")
    print(f"wrote {stem}.csv")
    text = (f"{len(xyz)} samples: {info['steps']} reverse-SDE steps to t_min = "
            f"{info['t_min']:g}")
    if args.corrector_steps:
        text += (f", {info['corrector_steps']} MALA steps (step {info['corrector_step_size']:.3g},"
                 f" acceptance {info['corrector_acceptance']:.2f})")
    if condition is not None:
        text += f", {int(mirrored.sum())} mirrored into L"
    print(f"{text}; {info['seconds']:.1f} s; learned energy {float(energy.mean()):.2f} kT on "
          "average")
    png = _png_path(args, args.out)
    pp = alanine_dihedrals(topology, xyz) if png else None
    if pp is not None:
        with _figure(png) as (ax,):
            _ramachandran(ax, pp, f"{os.path.basename(args.model)}: {len(pp)} samples")
    return 0


# ----------------------------------------------------------------------------- reweight

def _reweight_arguments(p) -> None:
    p.add_argument("model", type=_existing_file, help="model file (.pt) acting on all atoms")
    p.add_argument("--mode", choices=["iid", "md"], default="iid",
                   help="iid: samples from the model with exact flow-ODE log q; md: frames of "
                        "learned-force MD, log w = -u/kT + E(x, t_min)")
    p.add_argument("--n", type=positive_int, default=64, help="i.i.d. samples (--mode iid)")
    p.add_argument("--divergence", choices=["fast", "exact"], default="fast",
                   help="exact divergence for log q: forward Laplacian (fast) or autograd rows")
    p.add_argument("--solver", choices=["rk4", "dopri5"], default="rk4",
                   help="flow ODE solver for log q: rk4 on --steps steps packed toward t_min "
                        "(fixed cost), or adaptive dopri5 (samples whose solve fails are "
                        "dropped and counted)")
    p.add_argument("--steps", type=positive_int, default=200, help="RK4 steps")
    p.add_argument("--frames", nargs="+", default=None,
                   help="learned-force MD frames (any mdtraj format; --mode md); without them "
                        "MD is run from the structure")
    p.add_argument("--md-ps", type=positive_float, default=10.0,
                   help="MD per replica when no --frames are given, ps (1 fs steps, a frame "
                        "every 0.1 ps)")
    p.add_argument("--replicas", type=positive_int, default=1, help="MD replicas")
    p.add_argument("--anneal-stages", type=_nonnegative_int, default=0,
                   help="carry the samples on to the force field by annealed importance "
                        "sampling with this many stages (0: plain weights); exact weights, "
                        "far less spread when the stiff modes are off (see README)")
    p.add_argument("--anneal-steps", type=positive_int, default=10,
                   help="MALA steps per annealing stage")
    p.add_argument("--anneal-step-size", type=positive_float, default=None,
                   help="MALA step, model units^2 (default sigma(t_min)^2 / alpha(t_min)^2; "
                        "half that was accepted 72%% of the time for alanine dipeptide)")
    p.add_argument("--seed", type=int, default=0)
    _add_target_arguments(p)
    _add_output_arguments(p, "reweight.csv",
                          "per-sample results, .csv or .json: normalized log weight, u/kT, "
                          "and -log q (iid), E(x, t_min) (md) or, annealed, log w + u/kT",
                          "the phi free-energy profiles (alanine dipeptide)")


def _reweight_run(args) -> int:
    from .reweighting import reweight_iid, reweight_md

    model = _start(args)
    system, traj, temperature, condition = _target(args, model)
    top = traj.topology.to_openmm()
    cvs = ("phi", "psi") if _has_phi_psi(traj) else ()
    common = dict(temperature=temperature, topology=top, cvs=cvs, condition=condition,
                  seed=args.seed, progress=not args.no_progress,
                  anneal_stages=args.anneal_stages, anneal_steps=args.anneal_steps,
                  anneal_step_size=args.anneal_step_size)
    if args.mode == "iid":
        if args.frames:
            raise ValueError("--frames are for --mode md")
        res = reweight_iid(model, system, n=args.n, divergence=args.divergence,
                           solver=args.solver, steps=args.steps, **common)
        proposal = "nll"
    else:
        if args.frames:
            frames = load_structures(args.frames, args.top).xyz
            res = reweight_md(model, system, frames=frames, **common)
        else:
            res = reweight_md(model, system, positions=traj.xyz[:1].repeat(args.replicas, 0),
                              n_frames=max(1, int(round(args.md_ps * 10))), save_interval=0.1,
                              n_replicas=args.replicas, **common)
        proposal = "energy_kT"
    if args.anneal_stages:
        proposal = "log_w_plus_u"        # annealed: log w (unnormalized) + u/kT
    columns = {"sample": list(range(len(res.x))), "log_weight": res.log_weights.tolist(),
               "reduced_energy": res.reduced_energy.tolist(), proposal: res.proposal.tolist()}
    _write_rows(args.out, columns, {"model": os.path.abspath(args.model), "mode": args.mode,
                                    "ess": res.ess, "temperature_K": temperature,
                                    "info": {k: v for k, v in res.info.items()
                                             if isinstance(v, (int, float, str))}})
    print(f"{args.mode}: {len(res.x)} samples, Kish ESS {res.ess:.4f} "
          f"({res.ess * len(res.x):.1f} samples)"
          + (f", {res.info['condition_fraction']:.2f} inside --chirality"
             if "condition_fraction" in res.info else ""))
    for name, prof in res.profiles.items():
        print(f"{name}: reweighted free energy over {len(prof.centres)} bins, min at "
              f"{prof.centres[int(prof.f_kt.argmin())]:.2f} rad")
    print(f"wrote {args.out}")
    png = _png_path(args, args.out)
    if png and res.profiles:
        from . import plots

        plots.plot_free_energy_profiles(
            {"reweighted": res.profiles["phi"], "samples (unweighted)":
             res.proposal_profiles["phi"]}, png, xlabel="phi (rad)", ymax=15.0)
    return 0


# ----------------------------------------------------------------------------- compare

def _compare_arguments(p) -> None:
    p.add_argument("model", type=_existing_file, help="model file (.pt) acting on all atoms")
    p.add_argument("structures", nargs="+",
                   help="structures to compare (PDB, DCD, XTC, ...; at least 3 frames)")
    p.add_argument("--reference", default=None,
                   help="native structure (PDB) for RMSD, funnels and decoy ranking; default "
                        "the first frame")
    p.add_argument("--nll", action="store_true",
                   help="also the flow-ODE -log p0 of every structure (costly)")
    _add_target_arguments(p)
    _add_output_arguments(p, "compare.csv",
                          "per-structure results, .csv or .json: learned E(x, t_min) (kT), "
                          "classical u (kJ/mol) and u/kT, heavy-atom RMSD (nm)",
                          "the energy scatter (and <stem>_funnel.png)")


def _compare_run(args) -> int:
    from .compare import compare_energies

    model = _start(args)
    frames = load_structures(args.structures, args.top)
    if args.structure is None:
        args.structure, args.top = args.structures[0], args.top
    system, traj, temperature, _ = _target(args, model)
    if frames.n_atoms != system.getNumParticles():
        raise ValueError(f"the structures have {frames.n_atoms} atoms but the target System "
                         f"has {system.getNumParticles()}")
    reference = load_structures(args.reference).xyz[0] if args.reference else frames.xyz[0]
    heavy = [a.index for a in frames.topology.atoms if a.element.symbol != "H"]
    res = compare_energies(model, system, frames.xyz, temperature, reference=reference,
                           atom_indices=heavy, nll=args.nll,
                           nll_options={"divergence": "fast", "progress": not args.no_progress})
    columns = {"frame": list(range(frames.n_frames)), "learned_kT": res.learned_kt.tolist(),
               "classical_kj_per_mol": res.classical_kj_per_mol.tolist(),
               "classical_kT": res.reduced_classical.tolist(), "rmsd_nm": res.rmsd_nm.tolist()}
    if res.nll is not None:
        columns["nll_model"] = res.nll.tolist()
    c = res.learned_vs_classical
    _write_rows(args.out, columns, {"model": os.path.abspath(args.model),
                                    "learned_vs_classical": c, "ranking": res.ranking,
                                    "temperature_K": temperature})
    print(f"learned E vs classical u/kT over {frames.n_frames} structures: Pearson "
          f"{c['pearson']:.3f}, Spearman {c['spearman']:.3f}, slope {c['slope']:.3f} kT/kT")
    best = res.ranking["learned"]
    print(f"lowest learned energy: structure {best['best_index']} with RMSD rank "
          f"{best['rmsd_rank_of_best']} of {frames.n_frames}")
    print(f"wrote {args.out}")
    png = _png_path(args, args.out)
    if png:
        from . import plots

        plots.plot_energy_scatter(res.reduced_classical, res.learned_kt, png, fit=c)
        plots.plot_funnel(res.rmsd_nm, {"learned E_theta": res.learned_kt,
                                        "classical u/kT": res.reduced_classical},
                          png[:-4] + "_funnel.png")
    return 0


for _command in (
        Command("demo", "the alanine-dipeptide demo: learned MD, exact -log p0, reweighting",
                _demo_arguments, _demo_run,
                "Run OpenMM MD with the shipped all-atom model's force, draw i.i.d. samples "
                "with exact -log p0, reweight both to amber14, and report the ESS, the "
                "phi/psi JS divergence and the learned-vs-amber correlation, with plots and "
                "a trajectory."),
        Command("sample", "i.i.d. samples from a model (reverse SDE + MALA corrector)",
                _sample_arguments, _sample_run,
                "Draw independent samples from a model: Euler-Maruyama on the reverse-time "
                "SDE down to t_min, then Metropolis-adjusted Langevin steps on the model's "
                "own exp(-E(x, t_min)). Writes a trajectory of the model's particles, the "
                "learned energy of each sample and a phi/psi plot."),
        Command("reweight", "importance weights of model samples or learned MD to a force field",
                _reweight_arguments, _reweight_run,
                "Reweight i.i.d. model samples (exact flow-ODE log q) or learned-force MD "
                "frames to the Boltzmann density of a classical System; Kish ESS and "
                "phi/psi free-energy profiles."),
        Command("compare", "learned vs classical energies of structures (scatter, funnel)",
                _compare_arguments, _compare_run,
                "Compare the learned energy E(x, t_min) (and optionally -log p0) with a "
                "classical force field on a set of structures: Pearson, Spearman, slope in "
                "kT, RMSD funnel and decoy ranking."),
):
    register(_command)
