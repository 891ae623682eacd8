"""genline: one user action becomes a multimodal AI pipeline (copy → image → video → stored).

What an application service needs is importable from here::

    from genline import Genline, UserError

    with Genline() as genline:
        accepted = genline.submit({...})        # an ``Accepted``; raises a ``UserError`` when the request is wrong

The rest of the package is organised by what it holds (README, "Layout"): ``genline.config``,
``genline.storage``, ``genline.provider``, ``genline.pipelines``, ``genline.tasks``,
``genline.workers`` and ``genline.cli``. ``Genline`` and ``Accepted`` are imported on first use,
so ``import genline`` (or any of its small modules) does not load the database and HTTP stacks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from genline.config.errors import (
    ConfigError,
    GenlineError,
    IdempotencyConflict,
    InvalidState,
    NotFound,
    SpendCapExceeded,
    UserError,
    ValidationError,
)

if TYPE_CHECKING:
    from genline.pipelines.api import Genline
    from genline.pipelines.submit import Accepted

__all__ = [
    "Accepted",
    "ConfigError",
    "Genline",
    "GenlineError",
    "IdempotencyConflict",
    "InvalidState",
    "NotFound",
    "SpendCapExceeded",
    "UserError",
    "ValidationError",
]


def __getattr__(name: str) -> Any:
    if name == "Genline":
        from genline.pipelines.api import Genline

        return Genline
    if name == "Accepted":
        from genline.pipelines.submit import Accepted

        return Accepted
    raise AttributeError(f"module 'genline' has no attribute {name!r}")
