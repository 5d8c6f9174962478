"""One update's way through gradtel: the watched parameters and their layer labels, the scan on the device, the read-out, the update's health, the weights' health and the policy."""

__all__: list[str] = []
