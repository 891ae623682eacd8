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

from typing import Any

from genline.config.settings import Settings, load_settings
from genline.pipelines.request import validate_request
from genline.pipelines.runtime import Runtime
from genline.pipelines.status import pipeline_status
from genline.pipelines.submit import Accepted, submit_pipeline


class Genline:
    def __init__(self, settings: Settings | None = None, *, runtime: Runtime | None = None) -> None:
        if runtime is None:
            from genline.storage.migrate import require_current
            from genline.tasks.app import CeleryDispatcher, make_celery

            settings = settings or load_settings()
            require_current(settings.database_url)
            runtime = Runtime.from_settings(settings, CeleryDispatcher(make_celery(settings)))
        self.runtime = runtime

    def submit(self, request: dict[str, Any]) -> Accepted:
        """Validate and accept one request; returns at once with the pipeline's id. ``request["image"]``
        may be a URL, bytes, a binary file object, or a path inside an upload folder."""
        rt = self.runtime
        checked = validate_request(request, rt.catalog, upload_dirs=rt.settings.upload_dirs, url_policy=rt.url_policy)
        return submit_pipeline(rt, checked)

    def status(self, pipeline_id: str) -> dict[str, Any]:
        return pipeline_status(self.runtime, pipeline_id)

    def cancel(self, pipeline_id: str) -> dict[str, Any]:
        """Stop a pipeline: no later step starts; provider jobs that can be cancelled are."""
        from genline.pipelines.cancel import cancel_pipeline

        return cancel_pipeline(self.runtime, pipeline_id)

    def close(self) -> None:
        self.runtime.close()

    def __enter__(self) -> Genline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
