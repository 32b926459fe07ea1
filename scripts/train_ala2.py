"""Train the shipped alanine-dipeptide energy models (all-atom and coarse-grained).

    python scripts/train_ala2.py --kind aa --out models/ala2_aa.pt     # 22 atoms
    python scripts/train_ala2.py --kind cg --out models/ala2_cg.pt     # 5 backbone beads

Reads the reference MD made by scripts/generate_ala2_data.py, trains a MoleculeEnergy by
denoising score matching (EMA weights, optional Fokker-Planck penalty), checkpoints
atomically next to ``--out`` and resumes when rerun. The log goes to ``<out>.log``.
"""
import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import openmm_diffenergy as de  # noqa: E402
from openmm_diffenergy.cli import (add_model_arguments, add_train_config_arguments,  # noqa: E402
                                   model_options, train_config)
from openmm_diffenergy.training import init_from, train_and_save  # noqa: E402
from openmm_diffenergy.ala2 import (load_reference, particle_bonds, reference_scores,  # noqa: E402
                                   selection)
from openmm_diffenergy.models.prior import fit_prior  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--kind", choices=["aa", "cg"], required=True)
    ap.add_argument("--data", default=os.path.join(ROOT, "data", "ala2_vacuum.npz"))
    ap.add_argument("--out", required=True)
    add_model_arguments(ap)
    add_train_config_arguments(ap)
    ap.add_argument("--scores", choices=["none", "amber"], default="none",
                    help="amber: train on target scores too, the amber14 forces / kT of the "
                         "reference frames (TSM/DSM mixture; see openmm_diffenergy.training)")
    ap.add_argument("--init-from", default=None,
                    help="fine-tune: start from this model file's weights (new parameters keep "
                         "their initial values) instead of random ones")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args(argv)
    command = "python scripts/train_ala2.py " + " ".join(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)

    ref = load_reference(args.data)
    sel, torsions = selection(ref.topology, args.kind)
    xyz = torch.tensor(ref.xyz[:, sel], dtype=torch.float32)
    yc = xyz - xyz.mean(1, keepdim=True)
    length_scale = float(yc.pow(2).mean().sqrt())
    prior = None
    if args.prior == "fit":
        prior = fit_prior(xyz, particle_bonds(ref.topology, sel), length_scale, de.VPSDE(),
                          seed=args.seed, gain_scales=args.gain_scales)
    model = de.MoleculeEnergy(len(sel), torsions, length_scale=length_scale, seed=args.seed,
                              prior=prior, **model_options(args))
    config = train_config(args)
    header = [f"command: {command}"]
    if args.init_from and not os.path.exists(args.out + ".ckpt"):
        fresh = init_from(model, args.init_from)
        header.append(f"weights from {args.init_from}; new: {', '.join(fresh) or 'none'}")
    scores = None
    if args.scores == "amber":
        # one selected atom per particle: the mean force on a kept atom is the
        # conditional mean of its atomic force, so the same scores serve the CG model
        scores = torch.tensor(reference_scores(ref)[:, sel], dtype=torch.float32)
    masses = [float(ref.masses[i]) for i in sel]
    header.append(f"data: {args.data}, {len(xyz)} frames; particles {len(sel)}; length scale "
                  f"{length_scale:.4f} nm; torsions {len(torsions)}; scores {args.scores}")
    result = train_and_save(model, xyz, args.out, config=config, header=header,
                            training_info={"data": os.path.basename(args.data),
                                           "frames": len(xyz), "command": command,
                                           "scores": args.scores},
                            scores=scores,
                            masses=masses, temperature=300.0, kind=args.kind,
                            particle_selection=[int(i) for i in sel],
                            atom_names=[ref.atom_names[i] for i in sel])
    print(json.dumps(result["history"][-1]))


if __name__ == "__main__":
    main()
