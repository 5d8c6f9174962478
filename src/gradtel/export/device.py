"""The hardware a process trains on, named as dcgm-exporter names it (``Hostname``,
``UUID``, ``pci_bus_id``), so that a page that names a rank names its host and GPU, and
PromQL can join gradtel's series with the GPU's own health (XID errors, ECC, row remaps)."""

from __future__ import annotations

import socket
import uuid as uuids
from typing import Any

import torch

__all__ = ["device_labels", "gpu_uuid", "pci_bus_id"]


def gpu_uuid(uuid: Any) -> str:
    """A GPU's UUID as nvidia-smi and dcgm-exporter print it.

    >>> gpu_uuid("604ac76c-d9cf-fef3-62e9-d92044ab6e52")
    'GPU-604ac76c-d9cf-fef3-62e9-d92044ab6e52'
    """
    text = str(uuid)
    if text.startswith(("GPU-", "MIG-")):  # already prefixed (a MIG instance's own prefix)
        return text
    return f"GPU-{uuids.UUID(text)}"


def pci_bus_id(domain: int, bus: int, device: int) -> str:
    """A PCI address as nvidia-smi and dcgm-exporter print it (domain:bus:device.function;
    a GPU is function 0).

    >>> pci_bus_id(0, 0x3B, 0)
    '00000000:3B:00.0'
    """
    return f"{domain:08X}:{bus:02X}:{device:02X}.0"


def device_labels(device: torch.device) -> dict[str, str]:
    """The labels of ``gradtel_device_info`` for a process whose model lives on ``device``:
    the host, the device, and on CUDA the GPU's UUID and PCI address (empty otherwise)."""
    labels = {"host": socket.gethostname(), "device": str(device), "gpu_uuid": "", "pci_bus_id": ""}
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        props: Any = torch.cuda.get_device_properties(index)  # the stubs lack its pci_* fields
        labels["device"] = f"cuda:{index}"
        labels["gpu_uuid"] = gpu_uuid(props.uuid)
        labels["pci_bus_id"] = pci_bus_id(
            props.pci_domain_id, props.pci_bus_id, props.pci_device_id
        )
    return labels
