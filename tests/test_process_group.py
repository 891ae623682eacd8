"""Stopping the processes the demo and the tests start: a worker finishes the step it is running
(its pool is never signalled, only its main process is), and nothing a child started outlives it.

The first tests run small Python programs standing in for a worker and its pool, so each case is
exact; the last one stops a real `genline worker` in the middle of a step."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select

from genline.config.constants import StepStatus
from genline.pipelines.api import Genline
from genline.provider.simulator import SimConfig, start_simulator
from genline.storage.models import Step
from genline.workers.processes import Child, ProcessGroup
from tests.support.processes import group_and_runtime, wait_for, zero_setup_env

# A pool process: it does its work when its parent says so, and has SIGTERM's default action,
# as a Celery prefork pool process has.
POOL = """
import sys
sys.stdin.readline()
open(sys.argv[1], "w").write("finished")
"""

# A worker's main process: on SIGTERM it has its pool finish, waits for it, and exits with its code.
WARM = """
import signal, subprocess, sys
pool = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], stdin=subprocess.PIPE)
def warm_shutdown(*_):
    pool.stdin.write(b"finish\\n"); pool.stdin.flush()
    sys.exit(pool.wait())
signal.signal(signal.SIGTERM, warm_shutdown)
print(pool.pid, flush=True)
while True:
    signal.pause()
"""

# A main process that dies at SIGTERM, leaving behind a process of its group that ignores it.
LEAVES_ONE_BEHIND = """
import signal, subprocess, sys
deaf = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); signal.pause()"
left = subprocess.Popen([sys.executable, "-c", deaf])
print(left.pid, flush=True)
signal.pause()
"""

DEAF = """
import signal
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print(0, flush=True)
while True:
    signal.pause()
"""


def _start(group: ProcessGroup, tmp_path: Path, name: str, program: str, *args: str) -> int:
    """Start ``program`` as one of the group's children (in its own session, as ``start`` does) and
    return the number it prints once it is ready (a pid of its own process group, or 0)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(program), *args],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    group.children.append(Child(name, proc, tmp_path / f"{name}.log"))
    assert proc.stdout is not None
    with proc.stdout:
        return int(proc.stdout.readline())


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")  # a zombie has finished; only its parent's wait is missing


def test_stop_lets_a_worker_s_pool_finish_the_step_it_is_running(tmp_path: Path) -> None:
    group = ProcessGroup(log_dir=tmp_path, env={})
    done = tmp_path / "done"
    _start(group, tmp_path, "worker", WARM, textwrap.dedent(POOL), str(done))
    main = group.children[0].proc
    group.stop()
    # Had the pool process been sent the SIGTERM too, it would have died before it finished.
    assert main.returncode == 0
    assert done.read_text() == "finished"
    assert group.children == []


def test_stop_leaves_nothing_a_child_started_running(tmp_path: Path) -> None:
    group = ProcessGroup(log_dir=tmp_path, env={})
    left = _start(group, tmp_path, "careless", LEAVES_ONE_BEHIND)
    assert _running(left)
    group.stop()
    deadline = time.monotonic() + 10  # SIGKILL is delivered at once; its reaping is not ours to wait on
    while _running(left) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _running(left)


def test_stop_kills_a_child_that_ignores_sigterm_once_the_timeout_is_out(tmp_path: Path) -> None:
    group = ProcessGroup(log_dir=tmp_path, env={})
    _start(group, tmp_path, "deaf", DEAF)
    main = group.children[0].proc
    group.stop(timeout=0.2)
    assert main.returncode == -signal.SIGKILL


@pytest.mark.timeout(240)
def test_a_real_worker_stopped_in_the_middle_of_a_step_finishes_it_and_exits_cleanly(tmp_path: Path) -> None:
    """Real worker and poller processes on the zero-setup default; the provider's video download is
    slow (1 MiB at 256 KiB/s, in 256 KiB chunks), so the worker is inside the store step when it is told to stop."""
    key = "test-key-" + uuid.uuid4().hex
    config = SimConfig(
        api_key=key, image_seconds=0.2, video_seconds=0.2, video_bytes=1 << 20, download_bytes_per_s=1 << 18
    )
    with start_simulator(config) as sim:
        env = zero_setup_env(tmp_path, sim.base_url, key)
        group, rt = group_and_runtime(tmp_path, env)
        try:
            worker = group.start_worker("worker", concurrency=1)
            group.start_poller()
            pid = (
                Genline(runtime=rt)
                .submit(
                    {
                        "user_id": "seller-1",
                        "feature": "listing-video",
                        "description": "Hand-thrown stoneware mug, speckled glaze, 350 ml.",
                        "image": "https://cdn.example.com/mug.jpg",
                        "idempotency_key": "stop-mid-store",
                    }
                )
                .pipeline_id
            )

            def storing() -> Step | None:
                with rt.db.transaction() as s:
                    step = s.scalars(select(Step).where(Step.pipeline_id == pid, Step.kind == "store")).one()
                return step if step.status == StepStatus.RUNNING else None

            running = wait_for("the store step to start", storing, 120, group)
            group.stop()
            with rt.db.transaction() as s:
                store = s.get_one(Step, running.id)
            log = worker.log_path.read_text(errors="replace")
        finally:
            group.stop()
            rt.close()
    assert worker.proc.returncode == 0, log[-3000:]
    assert "exited with 'signal" not in log  # no pool process was killed
    assert (store.status, store.attempts) == (StepStatus.SUCCEEDED, 1)  # finished, by the run it was in
