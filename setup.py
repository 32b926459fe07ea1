"""Install openmm_diffenergy.

The pinned, tested stack is in requirements.txt (``make setup`` installs it); the
ranges below are what the package itself needs.
"""
from setuptools import find_packages, setup

setup(
    name="openmm_diffenergy",
    version="0.1.0",
    description="Diffusion models of molecules as learned energies inside OpenMM",
    packages=find_packages(include=["openmm_diffenergy", "openmm_diffenergy.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.9,<2.10",
        "openmm==8.6.1",
        "openmmtorch==1.5",
        "mdtraj",
        "parmed",
        "numpy>=2",
        "scipy",
        "torchdiffeq",
        "tqdm",
        "matplotlib",
    ],
    extras_require={"test": ["pytest"], "mbar": ["pymbar"]},
    entry_points={
        "console_scripts": ["diffenergy = openmm_diffenergy.cli:main"],
        "openmmml.potentials": [
            "diffenergy = openmm_diffenergy.openmmml_potential:DiffEnergyPotentialImplFactory"],
    },
)
