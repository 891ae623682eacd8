"""Driving drain mode and the simulator by hand in tests: take a nudge, run until a step of some kind
is nudged, script the simulator's faults and settings, read its counters and a step's rows."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from sqlalchemy import select

from genline.pipelines.dispatch import MemoryDispatcher
from genline.pipelines.engine import run_step
from genline.pipelines.runtime import Runtime
from genline.provider.simulator import SimulatorHandle
from genline.storage.models import Step
from genline.workers.poller import Poller


def faults(sim: SimulatorHandle, *entries: dict[str, Any]) -> None:
    """Script the simulator's next answers: ``{"method", "path", "status", "times", "retry_after"}``."""
    httpx.post(f"{sim.base_url}/_sim/faults", json={"script": list(entries)}).raise_for_status()


def sim_config(sim: SimulatorHandle, **changes: Any) -> None:
    httpx.post(f"{sim.base_url}/_sim/config", json=changes).raise_for_status()


def sim_stats(sim: SimulatorHandle) -> dict[str, Any]:
    return httpx.get(f"{sim.base_url}/_sim/stats").json()


def nudges(rt: Runtime) -> MemoryDispatcher:
    """The in-memory broker of drain mode (the ``rt`` fixtures'), whose nudges a test can take by hand."""
    assert isinstance(rt.dispatcher, MemoryDispatcher)
    return rt.dispatcher


def next_nudge(rt: Runtime) -> str:
    step_id = nudges(rt).pop()
    assert step_id is not None, "no step was nudged"
    return step_id


def kind_of(rt: Runtime, step_id: str) -> str:
    with rt.db.transaction() as s:
        return s.get_one(Step, step_id).kind


def step_row(rt: Runtime, pipeline_id: str, kind: str) -> Step:
    with rt.db.transaction() as s:
        return s.scalars(select(Step).where(Step.pipeline_id == pipeline_id, Step.kind == kind)).one()


def output_of(rt: Runtime, pipeline_id: str, kind: str) -> dict[str, Any]:
    output = step_row(rt, pipeline_id, kind).output
    assert output is not None, f"the {kind} step has no output: it has not succeeded"
    return output


def run_until(rt: Runtime, kind: str) -> str:
    """Run nudges and polls until a step of ``kind`` is nudged; return its id without running it."""
    poller = Poller(rt)
    loop = asyncio.new_event_loop()
    try:
        for _ in range(500):
            while (step_id := nudges(rt).pop()) is not None:
                if kind_of(rt, step_id) == kind:
                    return step_id
                run_step(rt, step_id)
            if not loop.run_until_complete(poller.run_once()):
                loop.run_until_complete(asyncio.sleep(0.01))  # the next poll is not due yet
        raise AssertionError(f"no {kind} step was nudged")
    finally:
        loop.run_until_complete(poller.aclose())
        loop.close()


def backoff_over(rt: Runtime, step_id: str) -> None:
    """Time passes until a step queued for a retry is due again (its ``not_before`` is reached)."""
    with rt.db.transaction() as s:
        step = s.get_one(Step, step_id)
        assert step.status == "queued", f"step {step_id} is {step.status}, not queued for a retry"
        step.not_before = None
