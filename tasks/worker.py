"""The module ``celery -A tasks.worker`` loads: settings are read (and checked) once, here."""

from __future__ import annotations

from genline.config.logging import configure_logging
from genline.config.settings import load_settings
from genline.tasks.app import flower_celery
from genline.tasks.task import celery_app

settings = load_settings()
configure_logging(settings.log_level)
app = celery_app(settings)
flower = flower_celery(settings)  # ``genline flower`` runs ``celery -A tasks.worker:flower flower``
