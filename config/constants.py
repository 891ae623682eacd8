"""Names that more than one module must spell the same way: queues, statuses, step kinds."""

from __future__ import annotations

from enum import StrEnum


class Queue(StrEnum):
    """Celery queues, split by kind of work so each can be scaled on its own."""

    COPY = "genline.copy"  # interactive: chat-model copywriting
    MEDIA = "genline.media"  # image and video submits (paid provider jobs)
    STORE = "genline.store"  # copies of finished results into our storage
    BATCH = "genline.batch"  # overnight work submitted with priority "batch"


ALL_QUEUES: tuple[str, ...] = tuple(q.value for q in Queue)


class StepKind(StrEnum):
    COPY = "copy"
    IMAGE = "image"
    VIDEO = "video"
    STORE = "store"


class PipelineStatus(StrEnum):
    PENDING = "pending"  # accepted, first step not yet started
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


PIPELINE_TERMINAL = frozenset({PipelineStatus.SUCCEEDED, PipelineStatus.FAILED, PipelineStatus.CANCELLED})


class StepStatus(StrEnum):
    PENDING = "pending"  # earlier steps not done yet
    QUEUED = "queued"  # a message was sent to run it
    RUNNING = "running"  # a worker is on it
    WAITING = "waiting"  # a provider job is in flight; the poller watches it
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


STEP_TERMINAL = frozenset({StepStatus.SUCCEEDED, StepStatus.FAILED, StepStatus.CANCELLED})


class JobStatus(StrEnum):
    """A provider-side job, as we know it. ``INTENT`` is ours: about to submit, no task_id yet."""

    INTENT = "intent"
    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    UNKNOWN = "unknown"  # ours: the step gave up while a submit's outcome was never learned


JOB_TERMINAL = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})

RUN_STEP_TASK = "genline.run_step"
IDEMPOTENCY_HEADER = "Idempotency-Key"
