"""Generate the alanine-dipeptide reference data: amber14 MD at 300 K.

Builds ACE-ALA-NME from internal coordinates (nothing downloaded), parameterizes it with
amber14 in vacuum (or OBC2), minimizes, and runs Langevin dynamics (1 fs, no
constraints, friction 1/ps), saving a frame every ``--save-ps``. The run is written in
chunks: after each chunk the frames and the integrator state are saved atomically, and
a rerun of the same command resumes where it stopped. The output ``.npz`` holds
``xyz`` (F, 22, 3) float32 nm, ``time_ps``, the topology as PDB text and the settings.

The work is done by :func:`openmm_diffenergy.ala2.generate_reference`; ``diffenergy
generate-data`` runs the same with the same options.

Usage::

    python scripts/generate_ala2_data.py --ns 20 --out data/ala2_vacuum.npz   # ~10 min
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import openmm_diffenergy  # noqa: E402,F401  (imports torch before openmm, as openmmtorch needs)
from openmm_diffenergy.ala2 import generate_reference  # noqa: E402
from openmm_diffenergy.cli import add_generate_data_arguments, generate_data_kwargs  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_generate_data_arguments(ap, os.path.join(ROOT, "data", "ala2_vacuum.npz"))
    args = ap.parse_args(argv)
    generate_reference(**generate_data_kwargs(args), log=lambda line: print(line, flush=True))


if __name__ == "__main__":
    main()
