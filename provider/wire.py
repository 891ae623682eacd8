"""The provider's wire contract (APIMart-style), parsed liberally and checked strictly.

Both documented shapes of a submit answer and both shapes of a result URL are accepted; anything
else is a ``ProviderBadResponse`` naming what was missing. Status codes map onto the error tree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from genline.config.constants import JobStatus
from genline.config.errors import (
    AuthenticationFailed,
    InsufficientBalance,
    ProviderBadResponse,
    ProviderError,
    ProviderForbidden,
    ProviderNotFound,
    ProviderRejected,
    ProviderUnavailable,
    RateLimited,
)

_KNOWN_STATUS = {s.value for s in JobStatus} - {JobStatus.INTENT.value}


@dataclass(frozen=True)
class ChatResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    model: str


@dataclass(frozen=True)
class SubmitResult:
    task_id: str
    status: str
    estimated_time_s: int | None = None


@dataclass(frozen=True)
class ResultAsset:
    url: str
    expires_at: datetime | None


@dataclass(frozen=True)
class TaskState:
    task_id: str
    status: str  # one of JobStatus, or the provider's unknown word (treated as not terminal)
    progress: int
    estimated_time_s: int | None = None
    assets: tuple[ResultAsset, ...] = ()
    error_code: str | None = None
    error_message: str | None = None
    completed_at: datetime | None = None
    known_status: bool = True
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


def _data(body: Any) -> Any:
    if not isinstance(body, dict):
        raise ProviderBadResponse("The provider answered with something other than a JSON object.")
    if "data" not in body:
        raise ProviderBadResponse("The provider's answer has no 'data' field.")
    return body["data"]


def parse_chat(body: Any) -> ChatResult:
    if not isinstance(body, dict):
        raise ProviderBadResponse("The provider's chat answer is not a JSON object.")
    try:
        text = body["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ProviderBadResponse("The provider's chat answer has no choices[0].message.content.") from None
    if not isinstance(text, str):
        raise ProviderBadResponse("The provider's chat answer content is not text.")
    usage = _mapping(body.get("usage"))
    return ChatResult(
        text=text,
        prompt_tokens=_int(usage.get("prompt_tokens")),
        completion_tokens=_int(usage.get("completion_tokens")),
        model=str(body.get("model", "")),
    )


def parse_submit(body: Any) -> SubmitResult:
    """``data`` is either ``[{"status", "task_id"}]`` or ``{"id", "status", "task_info", ...}``."""
    data = _data(body)
    if isinstance(data, list):
        if not data or not isinstance(data[0], dict):
            raise ProviderBadResponse("The provider's submit answer is an empty list.")
        item = data[0]
        task_id = item.get("task_id") or item.get("id")
        estimated = None
    elif isinstance(data, dict):
        item = data
        task_id = data.get("id") or data.get("task_id")
        info = _mapping(data.get("task_info"))
        estimated = info.get("estimated_time", data.get("estimated_time"))
    else:
        raise ProviderBadResponse("The provider's submit answer has a 'data' of an unknown shape.")
    if not isinstance(task_id, str) or not task_id:
        raise ProviderBadResponse("The provider's submit answer carries no task id.")
    return SubmitResult(
        task_id=task_id,
        status=str(item.get("status", "submitted")),
        estimated_time_s=_int_or_none(estimated),
    )


def parse_task(body: Any, *, task_id: str) -> TaskState:
    data = _data(body)
    if not isinstance(data, dict) or "status" not in data:
        raise ProviderBadResponse(f"The provider's answer for task {task_id} has no status.")
    status = str(data["status"]).lower()
    known = status in _KNOWN_STATUS
    error = data.get("error")
    error_code = error_message = None
    if isinstance(error, dict):
        error_code = str(error.get("code") or "") or None
        error_message = str(error.get("message") or "") or None
    elif error:
        error_message = str(error)
    assets: tuple[ResultAsset, ...] = ()
    completed_at = _time(data.get("completed"))
    if status == JobStatus.COMPLETED:
        assets = _assets(data.get("result"), task_id)
        if not assets:
            raise ProviderBadResponse(f"The provider says task {task_id} completed but gives no result URL.")
    return TaskState(
        task_id=str(data.get("id") or task_id),
        status=status,
        progress=max(0, min(100, _int(data.get("progress")))),
        estimated_time_s=_int_or_none(data.get("estimated_time")),
        assets=assets,
        error_code=error_code,
        error_message=error_message,
        completed_at=completed_at,
        known_status=known,
        raw=data,
    )


def _assets(result: Any, task_id: str) -> tuple[ResultAsset, ...]:
    if not isinstance(result, dict):
        return ()
    items: list[ResultAsset] = []
    for group in ("videos", "images"):
        for item in result.get(group) or []:
            if not isinstance(item, dict):
                continue
            urls = item.get("url")
            if isinstance(urls, str):
                urls = [urls]
            if not isinstance(urls, list):
                continue
            expires = _time(item.get("expires_at"))
            items.extend(ResultAsset(url=u, expires_at=expires) for u in urls if isinstance(u, str) and u)
    return tuple(items)


def error_for_status(
    status: int, body: Any, *, retry_after: str | None = None, request_id: str | None = None
) -> ProviderError:
    """Map an HTTP error answer onto the error tree, with a plain-English message."""
    detail = _error_detail(body)
    suffix = f" The provider said: {detail}" if detail else ""
    kw: dict[str, Any] = {"status_code": status, "request_id": request_id}
    if status == 400:
        return ProviderRejected("The provider rejected the request as invalid." + suffix, **kw)
    if status == 401:
        return AuthenticationFailed(
            "The provider did not accept our API key; an operator must check APIMART_API_KEY.", **kw
        )
    if status == 402:
        return InsufficientBalance(
            "The provider account has run out of balance; paid work is paused until it is topped up.", **kw
        )
    if status == 403:
        return ProviderForbidden("The provider refused this request (forbidden)." + suffix, **kw)
    if status == 404:
        return ProviderNotFound("The provider does not know this task or model." + suffix, **kw)
    if status == 429:
        return RateLimited("The provider is rate-limiting us.", retry_after=_float_or_none(retry_after), **kw)
    if status >= 500:
        return ProviderUnavailable(f"The provider is having trouble (HTTP {status}).", **kw)
    return ProviderBadResponse(f"The provider answered with unexpected HTTP {status}." + suffix, **kw)


def _error_detail(body: Any) -> str:
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:300]
        if isinstance(err, str):
            return err[:300]
        if body.get("message"):
            return str(body["message"])[:300]
    return ""


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _float_or_none(value: Any) -> float | None:
    try:
        return None if value is None else max(0.0, float(value))
    except (TypeError, ValueError):
        return None


def _time(value: Any) -> datetime | None:
    try:
        return None if value in (None, "", 0) else datetime.fromtimestamp(float(value), UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return None
