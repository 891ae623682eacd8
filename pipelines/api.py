"""The Python API for application services: submit a pipeline, get its id at once, read its status.

    from genline.pipelines.api import Genline

    with Genline() as genline:                      # settings from the environment
        accepted = genline.submit({
            "user_id": "seller-42", "feature": "listing-video",
            "description": "Hand-thrown stoneware mug, speckled glaze, 350 ml",
            "image": "https://cdn.example.com/mug.jpg", "profile": "standard",
            "idempotency_key": "listing-9f2c",
        })
        print(accepted.pipeline_id, genline.status(accepted.pipeline_id)["status"])

Validation is the CLI's, error for error: a bad request raises ``ValidationError`` (a
``UserError``) with ``.code``, ``.field`` and ``.message``, and nothing is created or enqueued.

The image is an http(s) URL, the photo itself (``bytes``, or a file object opened ``"rb"``), or a
path inside an upload folder (``GENLINE_UPLOAD_DIRS``): a service never needs to name a path.
Whatever its source, the image is decoded and re-encoded before it is stored or sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from genline.config.boundary import check_ready, guard_public_methods, translated
from genline.config.settings import Settings, load_settings
from genline.pipelines.estimate import Estimate, estimate_for_feature
from genline.pipelines.request import validate_request
from genline.pipelines.runtime import Runtime
from genline.pipelines.status import pipeline_status
from genline.pipelines.submit import Accepted, submit_pipeline


@guard_public_methods  # a database, broker, bucket or key that is wrong: ConfigError (config/boundary.py)
class Genline:
    def __init__(self, settings: Settings | None = None, *, runtime: Runtime | None = None) -> None:
        if runtime is None:
            from genline.storage.migrate import require_current
            from genline.tasks.app import CeleryDispatcher, make_celery

            settings = settings or load_settings()
            with translated(settings):  # checked now: a wrong setting is one ConfigError, nothing created
                require_current(settings.database_url)
                check_ready(settings)
                runtime = Runtime.from_settings(settings, CeleryDispatcher(make_celery(settings)))
        self.runtime = runtime

    def submit(self, request: dict[str, Any]) -> Accepted:
        """Validate and accept one request; returns at once with the pipeline's id. ``request["image"]``
        may be a URL, bytes, a binary file object, or a path inside an upload folder."""
        rt = self.runtime
        checked = validate_request(request, rt.catalog, upload_dirs=rt.settings.upload_dirs, url_policy=rt.url_policy)
        return submit_pipeline(rt, checked)

    def estimate(
        self,
        profile: str,
        *,
        description: str = "",
        models: Mapping[str, str] | None = None,
        batch: bool = False,
        feature: str | None = None,
    ) -> Estimate:
        """What one pipeline on ``profile`` would cost now, by step (``models``: step -> model, as a
        request names them). With ``feature``, what that feature may not ask is refused as in submit."""
        return estimate_for_feature(
            self.runtime.catalog, profile, feature=feature, description=description, models=models, batch=batch
        )

    def promote(self, pipeline_id: str, profile: str = "premium", *, idempotency_key: str | None = None) -> Accepted:
        """Render a finished draft again on ``profile`` as a new pipeline linked to it, reusing its
        copy and image (no second copy or image charge); estimated and capped like a submit."""
        from genline.pipelines.promote import promote_pipeline

        return promote_pipeline(self.runtime, pipeline_id, profile, idempotency_key=idempotency_key)

    def status(self, pipeline_id: str) -> dict[str, Any]:
        return pipeline_status(self.runtime, pipeline_id)

    def cancel(self, pipeline_id: str) -> dict[str, Any]:
        """Stop a pipeline: no later step starts; provider jobs that can be cancelled are."""
        from genline.pipelines.cancel import cancel_pipeline

        return cancel_pipeline(self.runtime, pipeline_id)

    def caps(self) -> list[dict[str, Any]]:
        """Each spend cap with its limit, spent, reserved and headroom this period (``genline caps``)."""
        from genline.pipelines.spend import cap_report

        return cap_report(self.runtime.db, self.runtime.catalog)

    def report(
        self,
        since: str | None = None,
        until: str | None = None,
        *,
        feature: str | None = None,
        model: str | None = None,
    ) -> dict[str, Any]:
        """Health per feature and model over ``[since, until)`` (ISO times or spans such as ``24h``;
        the last 24 hours by default), each figure beside the guide's target (``genline report``)."""
        from genline.pipelines.report import build_report, period_of

        start, end = period_of(since, until)
        rt = self.runtime
        return build_report(rt.db, rt.settings, since=start, until=end, feature=feature, model=model)

    def list_pipelines(self, where: Any = None, *, limit: int = 100) -> dict[str, Any]:
        """Pipelines newest first; ``where`` is a ``listing.PipelineFilter`` (``genline list``)."""
        from genline.pipelines.listing import PipelineFilter, list_pipelines

        return list_pipelines(self.runtime.db, where or PipelineFilter(), limit=limit)

    def retry(self, pipeline_id: str) -> dict[str, Any]:
        """Run a failed pipeline again from the step that failed; new paid jobs get new keys."""
        from genline.pipelines.retry import retry_pipeline

        return retry_pipeline(self.runtime, pipeline_id)

    def close(self) -> None:
        self.runtime.close()

    def __enter__(self) -> Genline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
