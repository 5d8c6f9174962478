"""Every Python snippet of the README runs, in order and in one namespace, as a reader
pasting them into one session would; its links to files of the repository resolve."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from opentelemetry.sdk.metrics import MeterProvider

from gradtel.tools.stack import free_port

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))


def snippets() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_every_python_snippet_of_the_readme_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    found = snippets()
    assert len(found) >= 4
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GRADTEL_PORT", "0")  # the snippets serve on the default port otherwise
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    namespace: dict[str, object] = {"__name__": "readme"}
    try:
        for number, code in enumerate(found, 1):
            exec(compile(code, f"README.md snippet {number}", "exec"), namespace)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        for name in ("server",):
            if name in namespace:
                namespace[name].close()  # type: ignore[attr-defined]
        for name in ("monitor", "ddp_monitor"):
            if name in namespace:
                namespace[name].close()  # type: ignore[attr-defined]


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a Markdown page's headings."""
    headings = re.findall(r"^#+ (.*)$", page.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_links_to_repository_files_and_sections_resolve(page: Path) -> None:
    broken = []
    for target, anchor in re.findall(r"\]\(([^)#:]*)(?:#([^)]*))?\)", page.read_text()):
        path = page if not target else page.parent / target
        if not path.exists():
            broken.append(target)
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}#{anchor}")
    assert broken == []


@pytest.mark.parametrize("readout", ["sync", "deferred"])
def test_the_own_logger_snippet_writes_each_update_at_its_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, readout: str
) -> None:
    """The README's SummaryWriter loop, read back by TensorBoard: 3 NaN in the update of
    step 3, under either read-out."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import gradtel

    (code,) = [snippet for snippet in snippets() if "SummaryWriter" in snippet]
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    backwards = [0]

    def nan_in_update_3(param: torch.Tensor) -> None:
        backwards[0] += 1
        if backwards[0] == 3:
            param.grad.view(-1)[:3] = float("nan")

    model[0].weight.register_post_accumulate_grad_hook(nan_in_update_3)

    # Counted by then: the weights stay finite, so the updates after stay healthy.
    def finite_step(*_: object) -> None:
        for p in model.parameters():
            torch.nan_to_num_(p.grad, nan=0.0)

    optimizer.register_step_pre_hook(finite_step)
    monitor = gradtel.GradMonitor(
        model, readout=readout, on_warning="ignore", meter_provider=MeterProvider()
    )
    loader = [(torch.randn(8, 4), torch.randn(8, 1)) for _ in range(5)]
    namespace = {"gradtel": gradtel, "model": model, "optimizer": optimizer, "monitor": monitor,
                 "loader": loader, "loss_fn": torch.nn.functional.mse_loss}  # fmt: skip
    try:
        exec(compile(code, "README.md own-logger snippet", "exec"), namespace)
    finally:
        monitor.close()
    events = EventAccumulator(str(tmp_path / "runs" / "gradtel"))
    events.Reload()
    written = {e.step: e.value for e in events.Scalars("gradtel/nan_total")}
    assert written == {1: 0.0, 2: 0.0, 3: 3.0, 4: 0.0, 5: 0.0}
