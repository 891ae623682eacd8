"""The poller's readers (``provider.poll_client``) against scripted servers that answer the ways real
ones do, and the ways broken or hostile ones do: framings, closed connections, garbage, TLS,
compression bombs, odd codings and line endings. No database: these run in the fast tier."""

from __future__ import annotations

import asyncio
import gzip
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from genline.config.errors import ProviderBadResponse, ProviderConnectionError, ProviderNotFound, ProviderTimeout
from genline.config.settings import Settings
from genline.provider.poll_client import AiohttpTaskReader, HttpTaskReader, make_task_reader
from tests.conftest import TEST_KEY
from tests.support.http_scripts import ScriptedServer, chunked, ok, self_signed, task_body, task_id_of

READERS = ["own", "aiohttp"]


def _reader(
    make_settings: Callable[..., Settings], base_url: str, kind: str = "own", **env: str
) -> HttpTaskReader | AiohttpTaskReader:
    settings = make_settings(base_url, **env)
    if kind == "aiohttp":
        return AiohttpTaskReader(settings, max_connections=4)
    return HttpTaskReader(settings, max_connections=4)


def _serve_one(answer: bytes, *, close: bool = False) -> Callable[[str, int], Any]:
    async def reply(path: str, nth: int) -> tuple[bytes, bool]:
        return answer, close

    return reply


async def _read_one(
    make_settings: Callable[..., Settings], answer: bytes, kind: str, *, close: bool = False, **env: str
) -> Any:
    """``get_task("t")`` once against a server that answers ``answer``; the state, or the error."""
    async with ScriptedServer(_serve_one(answer, close=close)) as server:
        reader = _reader(make_settings, server.base_url, kind, **env)
        try:
            state, _answer = await reader.get_task("t")
            return state
        finally:
            await reader.aclose()


# --- framings and connections ----------------------------------------------------------------------
def test_the_reader_reads_length_chunked_close_delimited_and_compressed_answers(
    make_settings: Callable[..., Settings],
) -> None:
    async def reply(path: str, nth: int) -> tuple[bytes, bool]:
        task_id = task_id_of(path)
        body = task_body(task_id)
        if task_id == "chunked":
            return ok(chunked(body, 7, 13), "Transfer-Encoding: chunked", "X-REQUEST-ID: req-chunked"), False
        if task_id == "until-close":
            return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + body, True
        if task_id == "gzipped":
            return ok(gzip.compress(body), "Content-Encoding: gzip"), False
        if task_id == "deflated":
            return ok(zlib.compress(body), "Content-Encoding: deflate"), False
        if task_id == "raw-deflated":
            squeezer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
            return ok(squeezer.compress(body) + squeezer.flush(), "Content-Encoding: deflate"), False
        if task_id == "interim":
            return b"HTTP/1.1 100 Continue\r\n\r\n" + ok(body), False
        return ok(body, "x-ratelimit-remaining: 17", "X-Request-Id: req-plain"), False

    async def scenario() -> None:
        async with ScriptedServer(reply) as server:
            reader = _reader(make_settings, server.base_url)
            try:
                state, answer = await reader.get_task("plain")
                assert (state.task_id, state.status, state.progress) == ("plain", "processing", 42)
                assert (answer.status_code, answer.request_id, answer.ratelimit_remaining) == (200, "req-plain", 17)
                for task_id in ("chunked", "until-close", "gzipped", "deflated", "raw-deflated", "interim", "plain"):
                    state, answer = await reader.get_task(task_id)
                    assert (state.task_id, state.progress) == (task_id, 42)
                assert answer.request_id == "req-plain"
                assert server.requests[0].startswith("GET /v1/tasks/plain HTTP/1.1\r\n")
                assert f"Authorization: Bearer {TEST_KEY}" in server.requests[0]
                assert server.connections == 2  # kept alive, except after the answer that ended with the connection
            finally:
                await reader.aclose()

    asyncio.run(scenario())


def test_the_reader_replaces_a_connection_the_server_closed_and_honours_connection_close(
    make_settings: Callable[..., Settings],
) -> None:
    async def reply(path: str, nth: int) -> tuple[bytes, bool]:
        task_id = task_id_of(path)
        if task_id == "dropped" and nth > 0:
            return b"", True  # a keep-alive connection the server closes as the request arrives
        if task_id == "then-close":
            return ok(task_body(task_id), "Connection: close"), False  # says close, leaves it to us
        return ok(task_body(task_id)), task_id == "closed-after"

    async def scenario() -> None:
        async with ScriptedServer(reply) as server:
            reader = _reader(make_settings, server.base_url)
            try:
                await reader.get_task("first")  # connection 1
                state, _ = await reader.get_task("dropped")  # connection 1, dropped: sent again on 2, no error
                assert state.task_id == "dropped"
                await reader.get_task("then-close")  # connection 2, closed by us after the answer
                await reader.get_task("closed-after")  # connection 3, closed by the server after the answer
                await asyncio.sleep(0.05)
                state, _ = await reader.get_task("last")  # connection 4
                assert state.task_id == "last"
                assert server.connections == 4
                assert len(server.requests) == 6
            finally:
                await reader.aclose()

    asyncio.run(scenario())


def test_the_reader_turns_errors_timeouts_and_garbage_into_provider_errors(
    make_settings: Callable[..., Settings],
) -> None:
    async def reply(path: str, nth: int) -> tuple[bytes, bool]:
        task_id = task_id_of(path)
        if task_id == "slow":
            await asyncio.sleep(5)
        if task_id == "missing":
            body = b'{"error": {"message": "No such task.", "code": "task_not_found"}}'
            return b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\nx-request-id: r404\r\n\r\n" % len(
                body
            ) + body, False
        if task_id == "not-json":
            return ok(b"<html>gateway</html>"), False
        if task_id == "not-http":
            return b"SSH-2.0-OpenSSH\r\n\r\n", False
        return ok(task_body(task_id)), False

    async def scenario() -> None:
        async with ScriptedServer(reply) as server:
            reader = _reader(make_settings, server.base_url, GENLINE_HTTP_TIMEOUT_S="0.2")
            try:
                with pytest.raises(ProviderNotFound) as not_found:
                    await reader.get_task("missing")
                assert not_found.value.answer is not None and not_found.value.answer.request_id == "r404"
                with pytest.raises(ProviderBadResponse) as not_json:
                    await reader.get_task("not-json")
                assert not_json.value.answer is not None and not_json.value.answer.status_code == 200
                with pytest.raises(ProviderBadResponse):
                    await reader.get_task("not-http")
                with pytest.raises(ProviderTimeout):
                    await reader.get_task("slow")
                state, _ = await reader.get_task("fine")  # the reader is still usable
                assert state.task_id == "fine"
            finally:
                await reader.aclose()
        unreachable = _reader(make_settings, "http://127.0.0.1:9")
        try:
            with pytest.raises(ProviderConnectionError):
                await unreachable.get_task("x")
        finally:
            await unreachable.aclose()

    asyncio.run(scenario())


def test_the_reader_opens_no_more_connections_than_its_limit(make_settings: Callable[..., Settings]) -> None:
    in_flight = 0
    most = 0

    async def reply(path: str, nth: int) -> tuple[bytes, bool]:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return ok(task_body(task_id_of(path))), False

    async def scenario() -> None:
        async with ScriptedServer(reply) as server:
            reader = _reader(make_settings, server.base_url)  # 4 connections
            try:
                states = await asyncio.gather(*(reader.get_task(f"t{i}") for i in range(40)))
                assert [s.task_id for s, _ in states] == [f"t{i}" for i in range(40)]
                assert server.connections == 4 and most == 4
                state, _ = await reader.get_task("odd id/with space")
                assert state.task_id == "odd id/with space"
                assert "GET /v1/tasks/odd%20id/with%20space HTTP/1.1" in server.requests[-1]
            finally:
                await reader.aclose()

    asyncio.run(scenario())


def test_the_reader_speaks_tls_and_checks_the_certificate(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    server_tls, client_tls = self_signed(tmp_path)

    async def reply(path: str, nth: int) -> tuple[bytes, bool]:
        return ok(task_body(task_id_of(path))), False

    async def scenario() -> None:
        async with ScriptedServer(reply, tls=server_tls) as server:
            trusting = HttpTaskReader(make_settings(server.base_url), max_connections=2, ssl_context=client_tls)
            try:
                for task_id in ("a", "b", "c"):
                    state, _ = await trusting.get_task(task_id)
                    assert state.task_id == task_id
                assert server.connections == 1
            finally:
                await trusting.aclose()
            default = HttpTaskReader(make_settings(server.base_url), max_connections=2)  # does not trust it
            try:
                with pytest.raises(ProviderConnectionError):
                    await default.get_task("a")
            finally:
                await default.aclose()

    asyncio.run(scenario())


def test_the_poller_reads_through_aiohttp_when_the_environment_names_a_proxy(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings("https://api.provider.example")
    for name in (
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
    ):
        monkeypatch.delenv(name, raising=False)
    assert isinstance(make_task_reader(settings, max_connections=4), HttpTaskReader)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    assert isinstance(make_task_reader(settings, max_connections=4), AiohttpTaskReader)
    monkeypatch.setenv("NO_PROXY", "api.provider.example")
    assert isinstance(make_task_reader(settings, max_connections=4), HttpTaskReader)


# --- hostile and odd answers: each a typed error or a right reading, quickly, in bounded memory ------
@pytest.mark.parametrize("kind", READERS)
@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_compression_bomb_is_refused_by_its_decoded_size(
    make_settings: Callable[..., Settings], kind: str, encoding: str
) -> None:
    """A valid answer of 40 MiB that travels as ~40 KB: the body limit counts the decoded bytes."""
    big = task_body("t", pad="0" * (40 * 1024 * 1024))
    squeezed = gzip.compress(big, 9) if encoding == "gzip" else zlib.compress(big, 9)
    assert len(squeezed) < 100_000
    with pytest.raises(ProviderBadResponse, match="too large"):
        asyncio.run(_read_one(make_settings, ok(squeezed, f"Content-Encoding: {encoding}"), kind))


@pytest.mark.parametrize("kind", READERS)
def test_an_answer_over_the_limit_is_refused_however_it_is_framed(
    make_settings: Callable[..., Settings], kind: str
) -> None:
    big = task_body("t", pad="0" * (17 * 1024 * 1024))  # over the 16 MiB limit
    for answer, close in (
        (ok(big), False),
        (ok(chunked(big, *([1 << 20] * 16)), "Transfer-Encoding: chunked"), False),
        (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + big, True),
    ):
        with pytest.raises(ProviderBadResponse, match="too large"):
            asyncio.run(_read_one(make_settings, answer, kind, close=close))


@pytest.mark.parametrize("kind", READERS)
@pytest.mark.parametrize("value", ["GZIP", "Gzip ", "x-GZIP"])
def test_content_codings_are_read_whatever_their_case(
    make_settings: Callable[..., Settings], kind: str, value: str
) -> None:
    answer = ok(gzip.compress(task_body("t")), f"Content-Encoding: {value}")
    state = asyncio.run(_read_one(make_settings, answer, kind))
    assert (state.task_id, state.progress) == ("t", 42)


@pytest.mark.parametrize("kind", READERS)
def test_transfer_codings_are_read_whatever_their_case(make_settings: Callable[..., Settings], kind: str) -> None:
    state = asyncio.run(_read_one(make_settings, ok(chunked(task_body("t"), 9), "Transfer-Encoding: Chunked"), kind))
    assert state.task_id == "t"


def test_an_unknown_content_coding_is_a_bad_response(make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(ProviderBadResponse, match="content coding"):
        asyncio.run(_read_one(make_settings, ok(b"\x8b\x00garbage", "Content-Encoding: br"), "own"))
    with pytest.raises(ProviderBadResponse, match="not valid"):
        asyncio.run(_read_one(make_settings, ok(b"not gzip at all", "Content-Encoding: gzip"), "own"))


@pytest.mark.parametrize("coding", ["gzip, chunked", "chunked, chunked", "deflate", "identity, gzip, chunked"])
def test_a_transfer_coding_other_than_chunked_is_a_bad_response(
    make_settings: Callable[..., Settings], coding: str
) -> None:
    body = chunked(gzip.compress(task_body("t")))
    with pytest.raises(ProviderBadResponse, match="transfer coding"):
        asyncio.run(_read_one(make_settings, ok(body, f"Transfer-Encoding: {coding}"), "own"))


def test_the_aiohttp_reader_refuses_a_transfer_coding_other_than_chunked(
    make_settings: Callable[..., Settings],
) -> None:
    body = chunked(gzip.compress(task_body("t")))
    with pytest.raises(ProviderBadResponse):
        asyncio.run(_read_one(make_settings, ok(body, "Transfer-Encoding: gzip, chunked"), "aiohttp"))


def test_a_folded_header_line_is_refused_not_read_as_a_header_of_its_own(
    make_settings: Callable[..., Settings],
) -> None:
    for fold in (" x-ratelimit-remaining: 5", "\tmore"):
        with pytest.raises(ProviderBadResponse, match="fold"):
            asyncio.run(_read_one(make_settings, ok(task_body("t"), "X-Note: first part", fold), "own"))


def test_the_aiohttp_reader_joins_a_folded_line_to_the_header_it_continues(
    make_settings: Callable[..., Settings],
) -> None:
    """aiohttp unfolds obs-fold as RFC 9112 (5.2) allows a client to: never a header of its own."""

    async def scenario() -> None:
        answer = ok(task_body("t"), "X-Note: first part", " x-ratelimit-remaining: 5")
        async with ScriptedServer(_serve_one(answer)) as server:
            reader = _reader(make_settings, server.base_url, "aiohttp")
            try:
                state, facts = await reader.get_task("t")
                assert (state.task_id, facts.ratelimit_remaining) == ("t", None)
            finally:
                await reader.aclose()

    asyncio.run(scenario())


@pytest.mark.parametrize("kind", READERS)
@pytest.mark.parametrize("framing", ["length", "chunked", "mixed"])
def test_bare_lf_line_endings_are_read_or_refused_at_once_never_left_to_time_out(
    make_settings: Callable[..., Settings], kind: str, framing: str
) -> None:
    body = task_body("t")
    if framing == "length":
        answer = b"HTTP/1.1 200 OK\nContent-Type: application/json\nContent-Length: %d\n\n" % len(body) + body
    elif framing == "chunked":
        answer = b"HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n\n" + chunked(body, 9, eol=b"\n")
    else:  # CRLF head, bare-LF chunk lines
        answer = ok(chunked(body, 9, eol=b"\n"), "Transfer-Encoding: chunked")
    started = time.perf_counter()
    try:
        state = asyncio.run(_read_one(make_settings, answer, kind, GENLINE_HTTP_TIMEOUT_S="3"))
    except ProviderBadResponse:
        pass
    else:
        assert state.task_id == "t"
    assert time.perf_counter() - started < 1.0


def test_malformed_heads_and_chunks_are_bad_responses(make_settings: Callable[..., Settings]) -> None:
    body = task_body("t")
    for answer in (
        ok(body, "Bad Name: x"),  # white space in a header name
        ok(body, "Content-Length: 10", "Content-Length: 12"),
        ok(body[:10], "Content-Length: -10"),
        ok(b"zz\r\n" + body + b"\r\n0\r\n\r\n", "Transfer-Encoding: chunked"),
        ok(b"5\r\nabcdefg\r\n0\r\n\r\n", "Transfer-Encoding: chunked"),
        b"HTTP/1.1 2x0 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
    ):
        with pytest.raises(ProviderBadResponse):
            asyncio.run(_read_one(make_settings, answer, "own"))
