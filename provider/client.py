"""The seam to the AI provider: one HTTP request per method, over httpx, speaking ``wire``.

``ProviderClient`` (sync, for workers: chat, submits, cancels) and the poller's readers
(``poll_client``: job states) share how an answer is read (``read_answer``); only the transport
differs. None of them retries, budgets or audits: that is the gateway's job. httpx exceptions are
translated here, at the boundary.

The API key goes into the Authorization header and nowhere else; it is never part of an error.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from genline.config.constants import IDEMPOTENCY_HEADER
from genline.config.errors import (
    ProviderBadResponse,
    ProviderConnectionError,
    ProviderError,
    ProviderTimeout,
)
from genline.config.settings import Secret, Settings
from genline.provider.wire import (
    ChatResult,
    SubmitResult,
    error_for_status,
    parse_chat,
    parse_submit,
)

SUBMIT_PATHS = {"image": "/v1/images/generations", "video": "/v1/videos/generations"}


@dataclass(frozen=True)
class Answer:
    """What the gateway needs to know of a call, besides the parsed value."""

    status_code: int
    request_id: str | None
    ratelimit_remaining: int | None


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    body: dict[str, Any] | None = None
    headers: dict[str, str] | None = None


def chat_request(model: str, messages: list[dict[str, str]], *, max_tokens: int, temperature: float) -> Request:
    return Request(
        "POST",
        "/v1/chat/completions",
        {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature},
    )


def submit_request(kind: str, payload: dict[str, Any], idempotency_key: str) -> Request:
    return Request("POST", SUBMIT_PATHS[kind], payload, {IDEMPOTENCY_HEADER: idempotency_key})


def cancel_request(task_id: str) -> Request:
    return Request("POST", f"/v1/tasks/{task_id}/cancel", {}, None)


def request_headers(api_key: Secret | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "genline/0.1"}
    if api_key is not None:
        headers["Authorization"] = f"Bearer {api_key.reveal()}"
    return headers


def _timeout(settings: Settings) -> httpx.Timeout:
    return httpx.Timeout(settings.http_timeout_s, connect=settings.http_connect_timeout_s)


@contextmanager
def translate_errors(path: str) -> Iterator[None]:
    """httpx's exceptions become ours; the request (and its headers) are never put in a message."""
    try:
        yield
    except httpx.TimeoutException as exc:
        error: ProviderError = ProviderTimeout(f"The provider did not answer {path} in time.")
        error.outcome_unknown = isinstance(exc, httpx.ReadTimeout)  # sent; the answer never came
        raise error from exc
    except httpx.TransportError as exc:
        error = ProviderConnectionError(f"The provider could not be reached for {path} ({type(exc).__name__}).")
        error.outcome_unknown = isinstance(exc, httpx.ReadError | httpx.RemoteProtocolError)
        raise error from exc


def answer_of(status: int, headers: Mapping[str, str]) -> Answer:
    """The facts of an answer the gateway audits. ``headers`` must look names up in any case
    (httpx's, aiohttp's and ``http_reader.Headers`` do)."""
    remaining = headers.get("x-ratelimit-remaining")
    return Answer(
        status_code=status,
        request_id=headers.get("x-request-id"),
        ratelimit_remaining=int(remaining) if remaining and remaining.isdigit() else None,
    )


def read_answer(status: int, headers: Mapping[str, str], raw: bytes) -> tuple[Any, Answer]:
    """Body (parsed JSON) and facts of an answer, whichever client carried it (httpx here, the
    poller's readers in ``poll_client``); ``raw`` is the body with its content coding undone.
    An HTTP error becomes the matching ProviderError, a body that is not JSON a
    ``ProviderBadResponse``; either carries the answer, for the gateway's audit."""
    answer = answer_of(status, headers)
    body: Any
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    err: ProviderError | None = None
    if status >= 400:
        err = error_for_status(status, body, retry_after=headers.get("retry-after"), request_id=answer.request_id)
    elif body is None:
        err = ProviderBadResponse(
            "The provider answered with something that is not JSON.",
            status_code=status,
            request_id=answer.request_id,
        )
    if err is not None:
        err.answer = answer
        raise err
    return body, answer


class ProviderClient:
    """Blocking client for workers (chat and submits)."""

    def __init__(self, settings: Settings, *, transport: httpx.BaseTransport | None = None) -> None:
        self._http = httpx.Client(
            base_url=settings.provider_base_url,
            headers=request_headers(settings.provider_api_key),
            timeout=_timeout(settings),
            transport=transport,
        )

    def send(self, request: Request) -> tuple[Any, Answer]:
        with translate_errors(request.path):
            response = self._http.request(request.method, request.path, json=request.body, headers=request.headers)
        return read_answer(response.status_code, response.headers, response.content)

    def chat(
        self, model: str, messages: list[dict[str, str]], *, max_tokens: int, temperature: float = 0.7
    ) -> tuple[ChatResult, Answer]:
        body, answer = self.send(chat_request(model, messages, max_tokens=max_tokens, temperature=temperature))
        return parse_chat(body), answer

    def submit(self, kind: str, payload: dict[str, Any], idempotency_key: str) -> tuple[SubmitResult, Answer]:
        body, answer = self.send(submit_request(kind, payload, idempotency_key))
        return parse_submit(body), answer

    def cancel(self, task_id: str) -> tuple[bool, Answer]:
        """Ask the provider to stop a job; False when it has already ended."""
        _body, answer = self.send(cancel_request(task_id))
        return True, answer

    def close(self) -> None:
        self._http.close()
