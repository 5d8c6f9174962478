"""The public surface is small and deliberate: changing it must change this test."""

from __future__ import annotations

import importlib
import pkgutil

import gradtel

EXPORTED = {
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
}


def modules() -> list[str]:
    """Every public module of the package, found by walking it (a new module is checked
    too); a ``_private`` module's names are the package's own."""
    return [
        info.name
        for info in pkgutil.walk_packages(gradtel.__path__, prefix="gradtel.")
        if not info.name.rsplit(".", 1)[-1].startswith("_")
    ]


def test_exported_names() -> None:
    assert set(gradtel.__all__) == EXPORTED
    for name in EXPORTED:
        assert getattr(gradtel, name) is not None


def test_every_module_lists_its_public_names() -> None:
    found = modules()
    assert {"gradtel.monitor", "gradtel.render.prometheus", "gradtel.integrations"} <= set(found)
    for name in found:
        module = importlib.import_module(name)
        # A room of the package (a subpackage) may hold nothing of its own.
        assert module.__all__ or hasattr(module, "__path__"), name
        for public in module.__all__:
            assert hasattr(module, public), f"{name}.{public}"


CORE = {
    "torch",
    "numpy",
    "opentelemetry-sdk",
    "opentelemetry-exporter-prometheus",
    "prometheus-client",
}


def test_the_core_install_is_lean() -> None:
    import re
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=!~ \[]", requirement)[0] for requirement in project["dependencies"]}
    assert names == CORE
    assert {"pyyaml", "grafana-foundation-sdk"} <= {
        re.split(r"[<>=!~ ]", r)[0] for r in project["optional-dependencies"]["deploy"]
    }


def test_neither_training_nor_the_plain_demo_imports_the_deploy_kit() -> None:
    import subprocess
    import sys

    script = (
        "import gradtel, gradtel.tools.demo, gradtel.integrations, sys; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('yaml', 'grafana_foundation_sdk')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.stdout.strip() == "[]", out.stderr


def test_render_without_the_deploy_extra_says_how_to_install_it(tmp_path: object) -> None:
    import subprocess
    import sys

    script = (
        "import sys\n"
        "class NoYaml:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('yaml', 'grafana_foundation_sdk'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name.split('.')[0])\n"
        "sys.meta_path.insert(0, NoYaml())\n"
        "from gradtel.tools.cli import main\n"
        f"sys.exit(main(['render', '--out', {str(tmp_path)!r}]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 1, out.stderr
    assert "gradtel render: needs the deploy extra" in out.stderr
    assert "pip install 'gradtel[deploy]'" in out.stderr


def test_importing_gradtel_leaves_dtensor_and_fsdp_to_the_application() -> None:
    """torch.distributed.tensor and torch.distributed.fsdp cost half a second at every start:
    gradtel finds their classes once the application has imported them, and a DTensor made
    after gradtel was imported is counted as its local shard."""
    import subprocess
    import sys

    script = """
import sys
import gradtel
from gradtel.pipeline.scan import count_nonfinite, countable_values
late = ("torch.distributed.tensor", "torch.distributed.fsdp")
print(sorted(m for m in late if m in sys.modules))
import torch, torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, init_device_mesh
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
mesh = init_device_mesh("cpu", (1,))
local = torch.tensor([1.0, float("nan"), float("inf")])
grad = DTensor.from_local(local, mesh, [Replicate()])
shard = countable_values(grad)
print(type(shard) is torch.Tensor and shard.data_ptr() == local.data_ptr(), count_nonfinite([shard]))
dist.destroy_process_group()
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.stdout.split("\n")[:2] == ["[]", "True {0: (1, 1)}"], out.stdout + out.stderr
