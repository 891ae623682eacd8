"""The provider's answers, as the contract documents them, are read whichever shape they take."""

from __future__ import annotations

import pytest

from genline.config.errors import (
    AuthenticationFailed,
    InsufficientBalance,
    ProviderBadResponse,
    ProviderNotFound,
    ProviderRejected,
    ProviderUnavailable,
    RateLimited,
)
from genline.provider.wire import error_for_status, parse_chat, parse_submit, parse_task


def test_submit_answer_as_a_list() -> None:
    result = parse_submit({"code": 200, "data": [{"status": "submitted", "task_id": "task_01A"}]})
    assert result.task_id == "task_01A"


def test_submit_answer_as_an_object_with_estimate() -> None:
    result = parse_submit(
        {
            "code": 200,
            "data": {
                "id": "task_01B",
                "status": "pending",
                "progress": 0,
                "task_info": {"can_cancel": True, "estimated_time": 300},
            },
        }
    )
    assert (result.task_id, result.estimated_time_s) == ("task_01B", 300)


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        {"code": 200},
        {"data": []},
        {"data": [{"status": "x"}]},
        {"data": {"status": "pending"}},
        {"data": "task"},
    ],
)
def test_submit_answer_without_a_task_id_is_a_clear_error(body: object) -> None:
    with pytest.raises(ProviderBadResponse):
        parse_submit(body)


def test_result_url_as_string_and_as_list() -> None:
    as_string = parse_task(
        {
            "data": {
                "id": "t",
                "status": "completed",
                "progress": 100,
                "completed": 1700000000,
                "result": {"videos": [{"url": "https://x/v.mp4", "expires_at": 1700086400}]},
            }
        },
        task_id="t",
    )
    as_list = parse_task(
        {
            "data": {
                "id": "t",
                "status": "completed",
                "result": {"images": [{"url": ["https://x/a.png", "https://x/b.png"]}]},
            }
        },
        task_id="t",
    )
    assert [a.url for a in as_string.assets] == ["https://x/v.mp4"]
    assert as_string.assets[0].expires_at is not None and as_string.assets[0].expires_at.timestamp() == 1700086400
    assert [a.url for a in as_list.assets] == ["https://x/a.png", "https://x/b.png"]
    assert as_list.assets[0].expires_at is None  # caller assumes completion + 24 h


def test_unknown_status_is_kept_and_flagged_not_terminal() -> None:
    state = parse_task({"data": {"id": "t", "status": "queued_for_gpu", "progress": 5}}, task_id="t")
    assert state.status == "queued_for_gpu" and not state.known_status


def test_failed_task_carries_the_providers_reason() -> None:
    state = parse_task(
        {"data": {"id": "t", "status": "failed", "error": {"code": "nsfw", "message": "blocked"}}}, task_id="t"
    )
    assert (state.error_code, state.error_message) == ("nsfw", "blocked")


def test_completed_without_url_is_a_bad_response() -> None:
    with pytest.raises(ProviderBadResponse):
        parse_task({"data": {"id": "t", "status": "completed", "result": {}}}, task_id="t")


def test_chat_answer_with_usage() -> None:
    result = parse_chat(
        {
            "model": "gpt-4o-mini",
            "choices": [{"message": {"role": "assistant", "content": "Hi"}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13},
        }
    )
    assert (result.text, result.prompt_tokens, result.completion_tokens) == ("Hi", 10, 3)


@pytest.mark.parametrize(
    ("status", "kind", "retryable"),
    [
        (400, ProviderRejected, False),
        (401, AuthenticationFailed, False),
        (402, InsufficientBalance, False),
        (404, ProviderNotFound, False),
        (429, RateLimited, True),
        (500, ProviderUnavailable, True),
        (503, ProviderUnavailable, True),
    ],
)
def test_status_codes_map_onto_the_error_tree(status: int, kind: type, retryable: bool) -> None:
    err = error_for_status(status, {"error": {"message": "nope"}}, retry_after="3")
    assert isinstance(err, kind) and err.retryable is retryable and err.status_code == status
    if isinstance(err, RateLimited):
        assert err.retry_after == 3.0
