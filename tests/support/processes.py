"""Helpers for tests that start real genline processes (``workers.processes.ProcessGroup``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from genline.config.settings import load_settings
from genline.pipelines.runtime import Runtime
from genline.storage.migrate import upgrade
from genline.tasks.app import CeleryDispatcher, make_celery
from genline.workers.processes import ProcessGroup


def zero_setup_env(tmp_path: Path, base_url: str, key: str) -> dict[str, str]:
    """The zero-setup default (SQLite, local files, the embedded broker) in ``tmp_path``, talking
    to a simulator on loopback."""
    return {
        "GENLINE_VAR_DIR": str(tmp_path / "var"),
        "APIMART_BASE_URL": base_url,
        "APIMART_API_KEY": key,
        "GENLINE_ALLOW_PRIVATE_HOSTS": "127.0.0.1",  # the simulator
    }


def group_and_runtime(tmp_path: Path, env: dict[str, str]) -> tuple[ProcessGroup, Runtime]:
    """The database made, a process group (logs in ``tmp_path/logs``) and a runtime of this
    process that nudges through the same broker as the group's workers."""
    settings = load_settings(env)
    upgrade(settings.database_url)
    group = ProcessGroup(log_dir=tmp_path / "logs", env=env)
    return group, Runtime.from_settings(settings, CeleryDispatcher(make_celery(settings)))


def wait_for(what: str, check: Callable[[], Any], timeout_s: float, group: ProcessGroup) -> Any:
    """``check()``'s first truthy answer, asked every 0.2 s; raises if a child of ``group`` died
    meanwhile, or if ``timeout_s`` passes first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        group.check()
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")
