"""Cancelling a pipeline: no later step starts, and provider jobs that can be stopped are stopped.

A job the provider cannot stop any more is still polled to its end, so what it costs is recorded.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from genline.config.boundary import config_error
from genline.config.clock import utcnow
from genline.config.constants import (
    JOB_TERMINAL,
    PIPELINE_TERMINAL,
    STEP_TERMINAL,
    JobStatus,
    PipelineStatus,
    StepStatus,
)
from genline.config.errors import InvalidState, NotFound, ProviderError
from genline.config.logging import get_logger
from genline.pipelines.engine import pipeline_cost
from genline.pipelines.runtime import Runtime
from genline.pipelines.spend import release
from genline.provider.gateway import CallContext
from genline.storage.models import Pipeline, ProviderJob, Step

log = get_logger("genline.cancel")


def cancel_pipeline(rt: Runtime, pipeline_id: str) -> dict[str, Any]:
    with rt.db.transaction() as s:
        pipeline = s.get(Pipeline, pipeline_id, with_for_update=True)
        if pipeline is None:
            raise NotFound(f"No pipeline has the id {pipeline_id!r}.", code="pipeline_not_found", field="id")
        if pipeline.status in PIPELINE_TERMINAL:
            raise InvalidState(
                f"Pipeline {pipeline_id} has already {pipeline.status}; there is nothing to cancel.",
                code="pipeline_finished",
                field="id",
            )
        pipeline.status = PipelineStatus.CANCELLED
        pipeline.error_code, pipeline.error_message = "cancelled", "Cancelled on request."
        pipeline.finished_at = utcnow()
        for step in pipeline.steps:
            if step.status not in STEP_TERMINAL:
                step.status = StepStatus.CANCELLED
        # What the caps hold for it goes back now; a job the provider cannot stop is still booked
        # as spent when it ends (spend.accrue), for the provider bills it.
        release(s.connection(), pipeline_id)
        in_flight = [
            (job.id, job.task_id, job.model, job.step_id)
            for job in s.scalars(
                select(ProviderJob)
                .join(Step)
                .where(
                    Step.pipeline_id == pipeline_id,
                    ProviderJob.task_id.is_not(None),
                    ProviderJob.status.not_in([str(x) for x in JOB_TERMINAL]),
                )
            )
        ]
        user_id, feature = pipeline.user_id, pipeline.feature
    stopped = left = 0
    refused: list[dict[str, str]] = []  # cancel calls that failed: the job was not stopped
    for job_id, task_id, model, step_id in in_flight:
        assert task_id is not None
        try:
            ok = rt.gateway.cancel(CallContext(user_id, feature, pipeline_id, step_id, model), task_id)
        except ProviderError as err:
            log.warning("provider_cancel_failed", task_id=task_id, code=err.code)
            said = config_error(err) or err  # a key the provider refuses is the operator's to fix
            refused.append({"task_id": task_id, "code": said.code, "message": said.message})
            ok = False
        if ok:
            stopped += 1
            with rt.db.transaction() as s:
                job = s.get_one(ProviderJob, job_id)
                job.status, job.next_poll_at = JobStatus.CANCELLED, None
        else:
            left += 1  # still polled to its end, so its cost is recorded
    with rt.db.transaction() as s:
        s.get_one(Pipeline, pipeline_id).cost_usd = pipeline_cost(s, pipeline_id)
    log.info("pipeline_cancelled", pipeline_id=pipeline_id, provider_jobs_cancelled=stopped, still_running=left)
    result: dict[str, Any] = {
        "pipeline_id": pipeline_id,
        "status": "cancelled",
        "provider_jobs_cancelled": stopped,
        "provider_jobs_left_running": left,
    }
    if refused:  # only then: the jobs left running include these, which the provider was asked in vain to stop
        result["provider_cancel_errors"] = refused
    return result
