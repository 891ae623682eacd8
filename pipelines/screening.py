"""What a seller wrote, screened before anything is stored, logged or sent: personal data masked or
refused, suspected prompt injection flagged or refused, as the feature's policy in the catalog says
(``features`` in config/catalog.json; a feature not listed gets the default: ``pii: mask``,
``injection: flag``).

``validate_request`` calls ``screen_description`` once, so the Python API, the CLI and batch lines
are screened alike, and the description a ``PipelineRequest`` carries is already the masked one:
that is what the pipeline row stores, the audit and the logs see, and the provider is sent.

A refusal (``pii_detected``, ``injection_suspected``) names the kinds it found, never the values.
A flag travels on the request as ``flags`` (stored on the pipeline, shown by ``status``, logged as
``injection_suspected`` when the pipeline is accepted).
"""

from __future__ import annotations

from dataclasses import dataclass

from genline.config.catalog import FeaturePolicy
from genline.config.errors import ValidationError
from genline.config.logging import get_logger
from genline.pipelines.injection import describe_signals, find_injection
from genline.pipelines.pii import describe_kinds, find_pii, mask_pii

log = get_logger("genline.screening")

INJECTION_FLAG = "injection_suspected"
PII_FLAG = "pii_masked"


@dataclass(frozen=True)
class Screened:
    text: str  # masked: what is stored, logged and sent
    flags: dict[str, list[str]]  # {"injection_suspected": [signals], "pii_masked": [kinds]}; empty if clean


def screen_description(text: str, policy: FeaturePolicy, *, feature: str, user_id: str | None = None) -> Screened:
    """Mask or refuse personal data, then flag or refuse suspected injection, per ``policy``."""
    flags: dict[str, list[str]] = {}
    findings = find_pii(text)
    if findings:
        kinds = sorted({f.kind for f in findings})
        if policy.pii == "reject":
            log.warning("pii_refused", user_id=user_id, feature=feature, kinds=kinds, audit=True)
            raise ValidationError(
                f"description holds {describe_kinds(kinds)}; feature {feature!r} accepts no personal data, "
                "so remove it and send the request again.",
                code="pii_detected",
                field="description",
            )
        text = mask_pii(text, findings)
        flags[PII_FLAG] = kinds
    signals = find_injection(text, policy.injection_blocklist)
    if signals:
        if policy.injection == "reject":
            log.warning("injection_refused", user_id=user_id, feature=feature, signals=list(signals), audit=True)
            raise ValidationError(
                f"description looks like a prompt injection ({describe_signals(signals)}); feature {feature!r} "
                "refuses such text, so describe only the product.",
                code="injection_suspected",
                field="description",
            )
        flags[INJECTION_FLAG] = list(signals)
    return Screened(text, flags)
