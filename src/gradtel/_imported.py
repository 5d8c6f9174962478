"""Classes of torch's distributed parts, looked up only where the application imported them.

``torch.distributed.tensor`` (``DTensor``) and ``torch.distributed.fsdp`` take about half a
second to import, more than the rest of gradtel: every training process would pay it at
start-up. A tensor or a module of their classes cannot exist before its part is imported,
so gradtel looks the class up among the modules already imported instead.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["imported"]


def imported(module: str, name: str) -> Any:
    """``module.name`` if the application has imported ``module``, else None.

    >>> imported("sys", "path") is sys.path, imported("no_such_module", "Class")
    (True, None)
    """
    return getattr(sys.modules.get(module), name, None)
