"""gradtel: always-on NaN/Inf gradient telemetry for PyTorch, exported to Prometheus.

>>> import gradtel, torch
>>> model = torch.nn.Linear(2, 1)
>>> monitor = gradtel.GradMonitor(model)
>>> model(torch.ones(1, 2)).sum().backward()
>>> monitor.collect().status
<Status.HEALTHY: 'healthy'>
"""

from .attach.clip import clip_grad_norm_
from .attach.origin import ddp_comm_hook
from .export.endpoint import DEFAULT_ADDR, DEFAULT_PORT, MetricsServer, PortInUseError, serve
from .export.telemetry import prometheus_meter_provider
from .health import GradHealth, HealthTally, Status, Thresholds
from .monitor import GradMonitor
from .pipeline.layers import OVERFLOW_LAYER, ROOT_LAYER, layer_name
from .pipeline.policy import NonFiniteGradientError

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_ADDR",
    "DEFAULT_PORT",
    "OVERFLOW_LAYER",
    "ROOT_LAYER",
    "GradHealth",
    "GradMonitor",
    "HealthTally",
    "MetricsServer",
    "NonFiniteGradientError",
    "PortInUseError",
    "Status",
    "Thresholds",
    "__version__",
    "clip_grad_norm_",
    "ddp_comm_hook",
    "layer_name",
    "prometheus_meter_provider",
    "serve",
]
