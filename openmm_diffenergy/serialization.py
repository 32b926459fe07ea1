"""XML round trips of Systems that hold a learned TorchForce.

On the pinned stack (openmm 8.5.2, openmmtorch 1.5) plain ``openmm.XmlSerializer``
round-trips a TorchForce (its model hex-encoded in the XML). With openmm 8.6 and the
openmmtorch 1.5 wheel, ``XmlSerializer.deserialize`` crashes the interpreter inside
``TorchForceProxy::deserialize`` (an ABI break, see
:func:`openmm_diffenergy.openmm_force.serializer_abi_mismatch`). :func:`deserialize_system`
reads such XML on either stack: it rebuilds each TorchForce from its encoded model in
Python and lets OpenMM read everything else.
"""
from __future__ import annotations

import copy
import io
import xml.etree.ElementTree as ET

import openmm

__all__ = ["serialize_system", "deserialize_system"]


def serialize_system(system: openmm.System) -> str:
    """XML of a System (``openmm.XmlSerializer.serialize``)."""
    return openmm.XmlSerializer.serialize(system)


def _torch_force(node):
    import torch

    from .openmm_force import load_openmmtorch

    openmmtorch = load_openmmtorch()
    data = node.get("encodedFileContents")
    if not data:
        raise ValueError("this TorchForce XML refers to a model file by name only; "
                         "deserialize it with openmm.XmlSerializer where the file exists")
    module = torch.jit.load(io.BytesIO(bytes.fromhex(data)), map_location="cpu")
    force = openmmtorch.TorchForce(module)
    force.setForceGroup(int(node.get("forceGroup", "0")))
    force.setOutputsForces(node.get("outputsForces", "0") == "1")
    force.setUsesPeriodicBoundaryConditions(node.get("usesPeriodic", "0") == "1")
    for p in node.findall("./GlobalParameters/Parameter"):
        force.addGlobalParameter(p.get("name"), float(p.get("default")))
    for p in node.findall("./ParameterDerivatives/Parameter"):
        force.addEnergyParameterDerivative(p.get("name"))
    for p in node.findall("./Properties/Property"):
        force.setProperty(p.get("name"), p.get("value"))
    return force


def deserialize_system(xml: str) -> openmm.System:
    """Read a System from XML, rebuilding TorchForces without the crashing C++ path.

    Forces keep their order, groups, global parameters and properties.
    """
    root = ET.fromstring(xml)
    forces = root.find("Forces")
    if root.tag != "System" or forces is None:
        raise ValueError("not the XML of an openmm.System")
    nodes = list(forces)
    torch_at = {k: n for k, n in enumerate(nodes) if n.get("type") == "TorchForce"}
    if not torch_at:
        return openmm.XmlSerializer.deserialize(xml)
    for node in torch_at.values():
        forces.remove(node)
    rest = openmm.XmlSerializer.deserialize(ET.tostring(root, encoding="unicode"))
    others = [copy.deepcopy(rest.getForce(i)) for i in range(rest.getNumForces())]
    while rest.getNumForces():
        rest.removeForce(rest.getNumForces() - 1)
    it = iter(others)
    for k in range(len(nodes)):
        rest.addForce(_torch_force(torch_at[k]) if k in torch_at else next(it))
    return rest
