"""Reading a pipeline's state for people and scripts (the CLI's ``status`` and the Python API)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from genline.config.errors import NotFound
from genline.pipelines.callbacks import callback_status
from genline.pipelines.runtime import Runtime
from genline.storage.models import Pipeline, ProviderJob


def pipeline_status(rt: Runtime, pipeline_id: str) -> dict[str, Any]:
    with rt.db.transaction() as s:
        pipeline = s.get(Pipeline, pipeline_id)
        if pipeline is None:
            raise NotFound(f"No pipeline has the id {pipeline_id!r}.", code="pipeline_not_found", field="id")
        jobs = {
            j.step_id: j
            for j in s.scalars(
                select(ProviderJob)
                .where(ProviderJob.step_id.in_([st.id for st in pipeline.steps]))
                .order_by(ProviderJob.created_at)
            )
        }
        steps = []
        for st in pipeline.steps:
            job = jobs.get(st.id)
            steps.append(
                {
                    "kind": st.kind,
                    "status": st.status,
                    "model": st.model,
                    "attempts": st.attempts,
                    "progress": 100 if st.status == "succeeded" else (job.progress if job else 0),
                    "error": {"code": st.error_code, "message": st.error_message} if st.error_code else None,
                }
            )
        outputs = {st.kind: st.output for st in pipeline.steps if st.output}
        stored = outputs.get("store", {})
        return {
            "id": pipeline.id,
            "status": pipeline.status,
            "user_id": pipeline.user_id,
            "feature": pipeline.feature,
            "profile": pipeline.profile,
            "idempotency_key": pipeline.idempotency_key,
            # What screening found in the description: {"injection_suspected": [signals], "pii_masked": [kinds]}.
            "flags": pipeline.flags or {},
            "injection_suspected": bool(pipeline.flags and "injection_suspected" in pipeline.flags),
            "estimated_cost_usd": str(pipeline.estimated_cost_usd),
            # Costs accrue as each call is booked; the estimate by step is the one reserved at submit.
            "cost_usd": str(pipeline.cost_usd),
            "reserved_usd": str(pipeline.reserved_usd),
            "estimate": pipeline.estimate,
            "promoted_from": pipeline.promoted_from,
            "batch_window": pipeline.batch_window,
            "copy": outputs.get("copy", {}).get("text"),
            "video": stored.get("video"),
            "image": stored.get("image"),
            "steps": steps,
            "error": {"code": pipeline.error_code, "message": pipeline.error_message} if pipeline.error_code else None,
            "created_at": pipeline.created_at.isoformat(),
            "finished_at": pipeline.finished_at.isoformat() if pipeline.finished_at else None,
            # Only for a pipeline with a callback_url: its webhook's state, tries and last failure.
            **({"callback": callback_status(s, pipeline.id)} if pipeline.callback_url else {}),
        }
