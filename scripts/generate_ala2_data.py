"""Generate the alanine-dipeptide reference data: amber14 MD at 300 K.

Builds ACE-ALA-NME from internal coordinates (nothing downloaded), parameterizes it with
amber14 in vacuum (or OBC2), minimizes, and runs Langevin dynamics (1 fs, no
constraints, friction 1/ps), saving a frame every ``--save-ps``. The run is written in
chunks: after each chunk the frames and the integrator state are saved atomically, and
a rerun of the same command resumes where it stopped. The output ``.npz`` holds
``xyz`` (F, 22, 3) float32 nm, ``time_ps``, the topology as PDB text and the settings.

Usage::

    python scripts/generate_ala2_data.py --ns 20 --out data/ala2_vacuum.npz   # ~10 min
"""
import argparse
import io
import json
import os
import sys
import time

import numpy as np
import torch  # noqa: F401  (import before openmm, as openmmtorch needs)
import openmm
from openmm import app, unit
from tqdm.auto import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from openmm_diffenergy.alanine import alanine_system, build_alanine_dipeptide, is_l_chiral  # noqa
from openmm_diffenergy.io import atomic_write  # noqa: E402

def atomic_savez(path, **arrays):
    with atomic_write(path) as fh:
        np.savez_compressed(fh, **arrays)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--ns", type=float, default=20.0, help="production length, ns")
    ap.add_argument("--save-ps", type=float, default=2.0, help="frame interval, ps")
    ap.add_argument("--chunk-ps", type=float, default=200.0, help="checkpoint interval, ps")
    ap.add_argument("--equilibrate-ps", type=float, default=100.0)
    ap.add_argument("--solvent", choices=["vacuum", "obc2"], default="vacuum")
    ap.add_argument("--temperature", type=float, default=300.0, help="K")
    ap.add_argument("--timestep-fs", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=2025)
    ap.add_argument("--platform", default="Reference",
                    help="for 22 atoms Reference ran ~20x faster than CPU on 2 cores")
    ap.add_argument("--out", default=os.path.join(ROOT, "data", "ala2_vacuum.npz"))
    args = ap.parse_args(argv)
    if args.ns <= 0 or args.save_ps <= 0 or args.temperature <= 0:
        ap.error("--ns, --save-ps and --temperature must be positive")

    top, pos = build_alanine_dipeptide()
    system = alanine_system(top, args.solvent, constraints=None)
    dt = args.timestep_fs * unit.femtoseconds
    integ = openmm.LangevinMiddleIntegrator(args.temperature * unit.kelvin, 1 / unit.picosecond, dt)
    integ.setRandomNumberSeed(args.seed)
    ctx = openmm.Context(system, integ, openmm.Platform.getPlatformByName(args.platform))
    steps_per_frame = int(round(args.save_ps * 1000 / args.timestep_fs))
    frames_total = int(round(args.ns * 1000 / args.save_ps))
    frames_per_chunk = max(1, int(round(args.chunk_ps / args.save_ps)))
    partial, state_file = args.out + ".partial.npz", args.out + ".state.xml"

    if os.path.exists(partial) and os.path.exists(state_file):
        done = dict(np.load(partial))
        xyz = list(done["xyz"])
        with open(state_file) as fh:
            ctx.setState(openmm.XmlSerializer.deserialize(fh.read()))
        print(f"resuming at frame {len(xyz)} of {frames_total}", flush=True)
    else:
        ctx.setPositions(pos)
        openmm.LocalEnergyMinimizer.minimize(ctx)
        ctx.setVelocitiesToTemperature(args.temperature * unit.kelvin, args.seed)
        integ.step(int(args.equilibrate_ps * 1000 / args.timestep_fs))
        xyz = []
    pdb = io.StringIO()
    app.PDBFile.writeFile(top, pos * unit.nanometer, pdb)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    settings.update(force_field="amber14-all" + ("+obc2" if args.solvent == "obc2" else ""),
                    integrator="LangevinMiddleIntegrator", friction_per_ps=1.0,
                    constraints=None)
    start = time.perf_counter()
    bar = tqdm(total=frames_total, initial=len(xyz), desc="ala2 MD frames", unit="frame")
    while len(xyz) < frames_total:
        for _ in range(min(frames_per_chunk, frames_total - len(xyz))):
            integ.step(steps_per_frame)
            x = ctx.getState(getPositions=True).getPositions(asNumpy=True)
            xyz.append(np.asarray(x.value_in_unit(unit.nanometer), dtype=np.float32))
            bar.update(1)
        atomic_savez(partial, xyz=np.array(xyz))
        state = openmm.XmlSerializer.serialize(ctx.getState(getPositions=True,
                                                            getVelocities=True))
        with atomic_write(state_file, "w") as fh:
            fh.write(state)
    bar.close()
    xyz = np.array(xyz)
    chiral = is_l_chiral(top, xyz)
    if not chiral.all():
        raise RuntimeError(f"{(~chiral).sum()} frames lost L-chirality; the run is invalid")
    atomic_savez(args.out, xyz=xyz, time_ps=np.arange(1, len(xyz) + 1) * args.save_ps,
                 topology_pdb=np.array(pdb.getvalue()), settings=np.array(json.dumps(settings)))
    os.remove(partial)
    os.remove(state_file)
    print(f"wrote {args.out}: {len(xyz)} frames, {len(xyz) * args.save_ps / 1000:g} ns "
          f"({time.perf_counter() - start:.0f} s this run)")


if __name__ == "__main__":
    main()
