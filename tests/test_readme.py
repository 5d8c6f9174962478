"""Every Python snippet of the README runs, in order and in one namespace, as a reader
pasting them into one session would; its links to files of the repository resolve."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch.distributed as dist

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
