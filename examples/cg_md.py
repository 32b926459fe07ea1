"""Coarse-grained MD of alanine dipeptide with the shipped 5-bead model.

The model ``models/ala2_cg.pt`` knows the five backbone beads C(ACE) N CA C N(NME) (its
metadata holds their atom indices and masses). The script maps an all-atom alanine
dipeptide onto those beads (``de.CoarseGraining``), builds a bead System with
``n_replicas`` non-interacting copies, adds the learned force (all copies in one batched
call per step), and runs Langevin dynamics with a DCD reporter. It then reads the
trajectory back with mdtraj, measures phi/psi of every frame of every copy, prints the
populations of the two basins of the reference run, named by where they are: C7eq
(phi < 0, -150 < psi < 100 degrees) and extended (phi < 0, psi > 100 or < -150), and of
phi > 0, beside those of the shipped amber14 reference run, and plots the Ramachandran
histogram to a PNG.

Usage::

    python examples/cg_md.py --ns 1 --replicas 4
"""
import argparse
import os
import sys

import numpy as np

import torch
import openmm_diffenergy as de   # import first: it loads torch before openmm's plugins
import mdtraj
import openmm
from openmm import app, unit
from openmm_diffenergy.ala2 import load_reference, phi_psi
from openmm_diffenergy.alanine import build_alanine_dipeptide

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def basins(pp_deg):
    """Fractions of frames in C7eq, extended and phi > 0, from phi/psi in degrees (F, 2)."""
    phi, psi = pp_deg[:, 0], pp_deg[:, 1]
    extended = (phi < 0) & ((psi > 100) | (psi < -150))
    c7eq = (phi < 0) & ~extended
    return float(c7eq.mean()), float(extended.mean()), float((phi >= 0).mean())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "ala2_cg.pt"),
                    help="5-bead alanine-dipeptide model")
    ap.add_argument("--ns", type=float, default=0.2, help="length per replica, ns")
    ap.add_argument("--steps", type=int, default=None, help="length in steps (overrides --ns)")
    ap.add_argument("--replicas", type=int, default=4, help="non-interacting copies")
    ap.add_argument("--temperature", type=float, default=300.0, help="K")
    ap.add_argument("--timestep-fs", type=float, default=2.0, help="fs")
    ap.add_argument("--save-ps", type=float, default=1.0, help="frame interval, ps")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (more than 1 fights OpenMM's threads on small machines)")
    ap.add_argument("--platform", default="Reference",
                    help="OpenMM platform (Reference is fastest for a few beads)")
    ap.add_argument("--out-dir", default="outputs", help="folder for cg_md.dcd/.pdb/.png")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = de.load_model(args.model)
    groups = [[i] for i in model.metadata["particle_selection"]]

    # all-atom structure -> beads
    aa_topology, aa_positions = build_alanine_dipeptide()
    cg = de.CoarseGraining(mdtraj.Topology.from_openmm(aa_topology), groups)
    bead_positions = cg.map_positions(aa_positions)                  # (5, 3) nm

    # bead System with replicas, and the learned force on all of them
    system, topology = de.replicate_system(cg.create_system(), args.replicas, cg.topology)
    de.add_learned_force(system, model, temperature=args.temperature * unit.kelvin,
                         n_replicas=args.replicas, masses=True)
    offsets = np.repeat(np.arange(args.replicas), cg.n_beads)[:, None] * [3.0, 0.0, 0.0]
    positions = np.tile(bead_positions, (args.replicas, 1)) + offsets

    integrator = openmm.LangevinMiddleIntegrator(args.temperature * unit.kelvin,
                                                 1 / unit.picosecond,
                                                 args.timestep_fs * unit.femtoseconds)
    integrator.setRandomNumberSeed(1)
    simulation = app.Simulation(topology, system, integrator,
                                openmm.Platform.getPlatformByName(args.platform))
    simulation.context.setPositions(positions * unit.nanometer)
    simulation.context.setVelocitiesToTemperature(args.temperature * unit.kelvin, 1)
    os.makedirs(args.out_dir, exist_ok=True)
    dcd, pdb = (os.path.join(args.out_dir, "cg_md" + ext) for ext in (".dcd", ".pdb"))
    with open(pdb, "w") as fh:
        app.PDBFile.writeFile(topology, positions * unit.nanometer, fh)
    every = max(1, int(round(args.save_ps * 1000 / args.timestep_fs)))
    steps = args.steps or int(round(args.ns * 1e6 / args.timestep_fs))
    simulation.reporters.append(app.DCDReporter(dcd, every))
    simulation.reporters.append(app.StateDataReporter(sys.stdout, max(every, steps // 10),
                                                      step=True, potentialEnergy=True,
                                                      temperature=True, speed=True))
    simulation.step(steps)
    del simulation   # closes the DCD file

    traj = mdtraj.load(dcd, top=pdb)
    xyz = traj.xyz.reshape(traj.n_frames, args.replicas, cg.n_beads, 3)
    pp = np.degrees(phi_psi(xyz.reshape(-1, cg.n_beads, 3), None, "cg"))
    c7eq, extended, phi_pos = basins(pp)
    print(f"{traj.n_frames} frames x {args.replicas} replicas: C7eq {c7eq:.1%}, "
          f"extended {extended:.1%}, phi > 0 {phi_pos:.1%}")
    reference = os.path.join(ROOT, "data", "ala2_vacuum.npz")
    if os.path.exists(reference):
        ref = load_reference(reference)
        ref_c7, ref_ext, ref_pos = basins(np.degrees(phi_psi(ref.xyz, ref.topology)))
        print(f"amber14 reference ({len(ref.xyz)} frames): C7eq {ref_c7:.1%}, "
              f"extended {ref_ext:.1%}, phi > 0 {ref_pos:.1%}")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png = os.path.join(args.out_dir, "cg_md.png")
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.hist2d(pp[:, 0], pp[:, 1], bins=60, range=[[-180, 180], [-180, 180]], cmin=1)
    ax.set_xlabel("phi (degrees)")
    ax.set_ylabel("psi (degrees)")
    ax.set_title(f"5-bead learned-force MD, {len(pp)} samples")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {dcd}, {pdb}, {png}")
    return {"frames": traj.n_frames, "phi_psi_deg": pp, "c7eq": c7eq, "extended": extended,
            "phi_positive": phi_pos,
            "png": png, "dcd": dcd}


if __name__ == "__main__":
    main()
