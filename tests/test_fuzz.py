"""Property-based tests at the boundaries: whatever a caller or a server sends, genline answers with
an accepted request or a known refusal, never an unhandled exception, and a refusal leaves nothing
behind (no row, no nudge, no provider request)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genline.cli.batch import requests_of
from genline.config.errors import GenlineError, ProviderError, UserError
from genline.config.settings import Settings
from genline.pipelines.api import Genline
from genline.pipelines.request import FIELDS
from genline.pipelines.runtime import Runtime
from genline.provider.poll_client import HttpTaskReader
from genline.provider.simulator import SimulatorHandle
from tests.support.http_scripts import ScriptedServer
from tests.support.refusal import footprint

FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=60),
    st.sampled_from(["https://cdn.example.com/mug.jpg", "http://127.0.0.1/x", "file:///etc/passwd", "standard"]),
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner), max_leaves=6
)
requests = st.dictionaries(st.sampled_from([*FIELDS, "extra", ""]), values, max_size=len(FIELDS) + 1)


def _codes_are_known(err: GenlineError) -> None:
    assert err.code and err.code.replace("_", "").isalnum() and err.message  # a stable code and a sentence


@FUZZ
@given(raw=requests)
def test_any_request_is_accepted_or_refused_with_a_code_and_a_refusal_leaves_nothing(
    rt: Runtime, sim: SimulatorHandle, raw: dict[str, Any]
) -> None:
    before = footprint(rt, sim)
    try:
        Genline(runtime=rt).submit(raw)
    except UserError as err:
        _codes_are_known(err)
        assert footprint(rt, sim) == before
    else:  # accepted: a pipeline was made, and nothing was sent to the provider yet
        after = footprint(rt, sim)
        assert after.provider_requests == before.provider_requests


@FUZZ
@given(lines=st.lists(st.binary(max_size=200) | st.text(max_size=200).map(str.encode), max_size=8))
def test_any_batch_file_gives_a_request_or_a_refusal_per_line(
    make_settings: Callable[..., Settings], tmp_path: Path, lines: list[bytes]
) -> None:
    from genline.config.catalog import load_catalog

    path = tmp_path / "batch.jsonl"
    path.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines))
    for _number, request, error in requests_of(path, load_catalog()):
        assert (request is None) != (error is None)
        if error is not None:
            assert error["error"]["code"] and error["error"]["message"]


@FUZZ
@given(answer=st.binary(max_size=400), close=st.booleans())
def test_any_bytes_from_the_provider_end_in_an_answer_or_a_typed_error_in_time(
    make_settings: Callable[..., Settings], answer: bytes, close: bool
) -> None:
    async def reply(path: str, nth: int) -> tuple[bytes, bool]:
        return answer, close

    async def scenario() -> None:
        async with ScriptedServer(reply) as server:
            reader = HttpTaskReader(make_settings(server.base_url, GENLINE_HTTP_TIMEOUT_S="0.5"), max_connections=2)
            try:
                await asyncio.wait_for(reader.get_task("task_1"), timeout=5)
            except ProviderError as err:
                _codes_are_known(err)
            finally:
                await reader.aclose()
            assert server.connections <= 1  # one connection, closed or kept; none leaked per read

    asyncio.run(scenario())


pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.NonInteractiveExampleWarning")
