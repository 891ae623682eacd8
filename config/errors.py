"""The one exception tree of genline, grouped by what the caller should do.

Every error a person can see carries a stable ``code`` (snake_case, never renamed once shipped),
a plain-English ``message`` and, where one field of a request is to blame, that ``field``.

    GenlineError
    ├── UserError                 the request is wrong: fix it and send it again (CLI exit 2)
    │   ├── ValidationError       one field of a pipeline request is invalid
    │   ├── IdempotencyConflict   the key was used before for a different request
    │   ├── NotFound              no pipeline with that id
    │   ├── InvalidState          the pipeline cannot do that now (e.g. cancel a finished one)
    │   └── SpendCapExceeded      the pipeline would cross a spend cap: wait for the period, or raise the cap
    ├── ConfigError               the operator's settings are wrong: refuse to start
    ├── ProviderError             a call to the AI provider failed
    │   ├── RetryableProviderError    try again later, with backoff
    │   │   ├── RateLimited           429; ``retry_after`` seconds when the provider said
    │   │   ├── ProviderUnavailable   5xx
    │   │   ├── ProviderTimeout       the call timed out
    │   │   ├── ProviderConnectionError  connection refused or reset
    │   │   ├── ProviderBadResponse   the answer did not follow the contract
    │   │   ├── CircuitOpen           this model keeps failing: we did not call it (use the next one)
    │   │   └── ProviderPaused        paid work is paused after a 401/402: we did not call
    │   └── PermanentProviderError    never retry this request
    │       ├── ProviderRejected      400: invalid parameters or content moderation
    │       ├── ProviderForbidden     403
    │       ├── ProviderNotFound      404: unknown task or model
    │       ├── ProviderJobFailed     the provider's job ended failed or cancelled
    │       └── AccountError          stop paid work and alert the operator
    │           ├── AuthenticationFailed  401
    │           └── InsufficientBalance   402
    └── StorageError              copying or reading an object failed
        ├── RetryableStorageError     the store or the source hiccuped: try again
        └── ResultExpired             the provider's temporary URL is gone for good

Third-party exceptions are translated at the boundary that meets them, always ``raise ... from``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # config/ never imports provider/ at run time
    from genline.provider.client import Answer


class GenlineError(Exception):
    """Root of every error genline raises on purpose."""

    code = "genline_error"
    retryable = False

    def __init__(self, message: str, *, code: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.field = field

    def to_dict(self) -> dict[str, Any]:
        """The shape scripts read: ``{"code", "field", "message"}``."""
        return {"code": self.code, "field": self.field, "message": self.message}

    def __str__(self) -> str:
        return self.message


# --- the caller's request is wrong -------------------------------------------------------------
class UserError(GenlineError):
    code = "invalid_request"


class ValidationError(UserError):
    code = "invalid_field"


class IdempotencyConflict(UserError):
    code = "idempotency_conflict"


class NotFound(UserError):
    code = "not_found"


class SpendCapExceeded(UserError):
    """Accepting the pipeline (or a paid call of it) would cross a spend cap. ``field`` names what
    the cap is kept per (``user_id``, ``feature``), or is None for a global cap."""

    code = "spend_cap_exceeded"


class InvalidState(UserError):
    code = "invalid_state"


# --- the operator's settings are wrong ---------------------------------------------------------
class ConfigError(GenlineError):
    code = "invalid_config"


# --- the provider ------------------------------------------------------------------------------
class ProviderError(GenlineError):
    code = "provider_error"
    #: True when genline refused the call itself (a stage), so the provider never saw it.
    nothing_sent = False

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status_code: int | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.status_code = status_code
        self.request_id = request_id
        #: The HTTP answer that carried this error, when there was one (for the gateway's audit).
        self.answer: Answer | None = None
        #: The request reached the provider but its answer never came back (a read timeout, a
        #: connection lost mid-answer): the provider may have done, and billed, the work.
        self.outcome_unknown = False


class RetryableProviderError(ProviderError):
    code = "provider_retryable"
    retryable = True


class RateLimited(RetryableProviderError):
    code = "provider_rate_limited"

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class ProviderUnavailable(RetryableProviderError):
    code = "provider_unavailable"


class ProviderTimeout(RetryableProviderError):
    code = "provider_timeout"


class ProviderConnectionError(RetryableProviderError):
    code = "provider_connection_error"


class ProviderBadResponse(RetryableProviderError):
    code = "provider_bad_response"


class CircuitOpen(RetryableProviderError):
    code = "provider_circuit_open"
    nothing_sent = True


class ProviderPaused(RetryableProviderError):
    code = "provider_paused"
    nothing_sent = True


class PermanentProviderError(ProviderError):
    code = "provider_permanent"


class ProviderRejected(PermanentProviderError):
    code = "provider_rejected_request"


class ProviderForbidden(PermanentProviderError):
    code = "provider_forbidden"


class ProviderNotFound(PermanentProviderError):
    code = "provider_not_found"


class ProviderJobFailed(PermanentProviderError):
    code = "provider_job_failed"


class AccountError(PermanentProviderError):
    code = "provider_account_error"


class AuthenticationFailed(AccountError):
    code = "provider_auth_failed"


class InsufficientBalance(AccountError):
    code = "provider_insufficient_balance"


# --- object storage ----------------------------------------------------------------------------
class StorageError(GenlineError):
    code = "storage_error"


class RetryableStorageError(StorageError):
    code = "storage_retryable"
    retryable = True


class ResultExpired(StorageError):
    code = "result_expired"
