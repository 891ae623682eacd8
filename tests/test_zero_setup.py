"""The zero-setup default end to end, as ``make demo`` runs it: the simulator over HTTP, a real Celery
worker process and the poller process on the embedded broker (SQLite), SQLite state and local
files, with the shipped settings (only the var folder is the test's own)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from genline.config.settings import load_settings
from genline.pipelines.api import Genline
from genline.pipelines.runtime import Runtime


def test_pipelines_run_end_to_end_in_real_worker_and_poller_processes_on_the_embedded_broker(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GENLINE_", "APIMART_"))}
    env["GENLINE_VAR_DIR"] = str(tmp_path / "var")
    done = subprocess.run(
        [sys.executable, "-m", "genline", "demo", "--count", "2", "--json", "--timeout", "240"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    report = json.loads(done.stdout)
    assert report["succeeded"] == report["total"] == 2

    settings = load_settings({"GENLINE_VAR_DIR": env["GENLINE_VAR_DIR"]})
    assert settings.broker_url == "embedded" and settings.database_url.startswith("sqlite")
    logs = {p.name for p in (settings.var_dir / "logs").iterdir()}
    assert {"worker1.log", "poller.log"} <= logs  # the work really ran in those processes
    with Genline(runtime=Runtime.from_settings(settings)) as api:
        for row in report["pipelines"]:
            status = api.status(row["pipeline_id"])
            assert status["status"] == "succeeded"
            assert [s["status"] for s in status["steps"]] == ["succeeded"] * 4
            video = status["video"]
            data = Path(video["location"]).read_bytes()
            assert len(data) == video["size"] > 0
            assert hashlib.sha256(data).hexdigest() == video["sha256"]
            assert video["content_type"] == "video/mp4"
