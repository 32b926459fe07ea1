"""A standard OpenMM script with a learned energy added beside amber14.

Alanine dipeptide is built from internal coordinates and parameterized with amber14 in
vacuum (HBonds constraints). The shipped all-atom model ``models/ala2_aa.pt`` adds
``U_learned = w * kT * E_theta(x, t_min)`` (kJ/mol) on all 22 atoms, in its own force
group, so the learned term can be read alone. The weight ``w`` scales ``kT``: the
force's temperature argument is ``w * T``. Then a ``Simulation`` runs Langevin dynamics
with the usual reporters (StateDataReporter to the screen, DCDReporter to a file).

(Wrapping the TorchForce in a ``CustomCVForce`` to scale it would be the textbook way,
but with the pinned openmm 8.6.1 / openmmtorch 1.5 wheels it crashes the interpreter:
CustomCVForce copies its inner force through the XML serializer, whose TorchForce
reader is broken there.)

Usage::

    python examples/add_to_openmm_script.py --steps 2000 --weight 0.1
"""
import argparse
import os
import sys

import torch
import openmm_diffenergy as de   # import first: it loads torch before openmm's plugins
import openmm
from openmm import app, unit
from openmm_diffenergy.alanine import alanine_system, build_alanine_dipeptide

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "ala2_aa.pt"),
                    help="all-atom alanine-dipeptide model (22 particles)")
    ap.add_argument("--weight", type=float, default=0.1,
                    help="w in U = U_amber14 + w kT E_learned")
    ap.add_argument("--temperature", type=float, default=300.0, help="K")
    ap.add_argument("--timestep-fs", type=float, default=2.0, help="fs (HBonds constrained)")
    ap.add_argument("--steps", type=int, default=2000, help="MD steps")
    ap.add_argument("--report-every", type=int, default=100, help="steps between reports")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (more than 1 fights OpenMM's threads on small machines)")
    ap.add_argument("--platform", default="Reference", help="OpenMM platform")
    ap.add_argument("--out", default="outputs/ala2_amber_plus_learned.dcd", help="DCD to write")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    # 1. an ordinary amber14 System
    topology, positions = build_alanine_dipeptide()
    system = alanine_system(topology, "vacuum", constraints=app.HBonds)

    # 2. the learned energy beside it, in force group 1
    temperature = args.temperature * unit.kelvin
    de.add_learned_force(system, args.model, temperature=args.weight * temperature,
                         masses=True, force_group=1)

    # 3. a standard Simulation with reporters
    integrator = openmm.LangevinMiddleIntegrator(temperature, 1 / unit.picosecond,
                                                 args.timestep_fs * unit.femtoseconds)
    integrator.setRandomNumberSeed(1)
    simulation = app.Simulation(topology, system, integrator,
                                openmm.Platform.getPlatformByName(args.platform))
    simulation.context.setPositions(positions * unit.nanometer)
    simulation.minimizeEnergy()
    simulation.context.setVelocitiesToTemperature(temperature, 1)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    simulation.reporters.append(app.DCDReporter(args.out, args.report_every))
    simulation.reporters.append(app.StateDataReporter(
        sys.stdout, args.report_every, step=True, potentialEnergy=True, temperature=True,
        speed=True))
    simulation.step(args.steps)

    state = simulation.context.getState(getEnergy=True, getPositions=True)
    total = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    learned = de.learned_energy(simulation.context).value_in_unit(unit.kilojoule_per_mole)
    print(f"after {args.steps} steps: potential {total:.2f} kJ/mol, of which the learned "
          f"term (w = {args.weight:g}) is {learned:.2f} kJ/mol; wrote {args.out}")
    return {"potential_kj_mol": total, "learned_kj_mol": learned,
            "positions_nm": state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)}


if __name__ == "__main__":
    main()
