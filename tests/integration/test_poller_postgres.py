"""The poller's PostgreSQL path (one-statement claim, bulk routine update, audit by COPY, the ORM
only for jobs that end) on a real database against the real simulator, and the poller's own
HTTP/1.1 reader against servers that answer in the ways real ones do."""

from __future__ import annotations

import asyncio
import gzip
import ipaddress
import json
import ssl
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
from sqlalchemy import select, update

from genline.config.errors import ProviderBadResponse, ProviderConnectionError, ProviderNotFound, ProviderTimeout
from genline.config.settings import Settings
from genline.pipelines.runtime import Runtime
from genline.provider.poll_client import HttpTaskReader
from genline.provider.simulator import SimulatorHandle
from genline.storage.migrate import upgrade
from genline.storage.models import Pipeline, ProviderCall, ProviderJob, Step
from genline.workers.poller import Poller
from lab.bench_http import create_tasks
from tests.conftest import TEST_KEY

INTERVAL_S = 2.0
LONG_S = 3600.0  # a render that stays in flight for the whole test
SUBMITTED_AGO_S = 2900.0  # past 80% of the estimate, under 200%: the next poll is one interval away
SLACK_S = 0.05  # rounding between our clock, PostgreSQL's timestamps and float epochs


@pytest.fixture
def pg_rt(pg_url: str, sim: SimulatorHandle, make_settings: Callable[..., Settings]) -> Iterator[Runtime]:
    upgrade(pg_url)
    settings = make_settings(sim.base_url, GENLINE_DATABASE_URL=pg_url, GENLINE_POLL_INTERVAL_S=str(INTERVAL_S))
    rt = Runtime.from_settings(settings)  # the in-memory dispatcher: nudges are kept in order
    yield rt
    rt.close()


def _sim_config(sim: SimulatorHandle, **changes: Any) -> None:
    httpx.post(f"{sim.base_url}/_sim/config", json=changes).raise_for_status()


def _faults(sim: SimulatorHandle, *entries: dict[str, Any]) -> None:
    httpx.post(f"{sim.base_url}/_sim/faults", json={"script": list(entries)}).raise_for_status()


def _submit(rt: Runtime, sim: SimulatorHandle, n: int, *, seconds: float, prefix: str) -> list[str]:
    _sim_config(sim, video_seconds=seconds)  # the simulator fixes a job's duration at its submit
    model = rt.catalog.profiles["standard"].video_models[0]
    return asyncio.run(create_tasks(sim.base_url, TEST_KEY, n, model=model, prefix=prefix))


def _seed(
    rt: Runtime, task_ids: list[str], *, prefix: str, status: str = "processing", due_ago_s: float = 1.0
) -> list[str]:
    """One pipeline per task: copy and image done, video waiting on the job, store pending. All due
    ``due_ago_s`` ago."""
    model = rt.catalog.profiles["standard"].video_models[0]
    now = datetime.now(UTC)
    with rt.db.transaction() as s:
        for i, task_id in enumerate(task_ids):
            pid = f"pl_{prefix}{i}"
            s.add(
                Pipeline(
                    id=pid,
                    user_id=f"user-{prefix}{i}",
                    feature=f"feature-{i % 3}",
                    profile="standard",
                    description="d",
                    image_ref="i",
                    image_url="https://x/i.png",
                    idempotency_key=f"{prefix}{i}",
                    request_hash="h",
                    status="running",
                )
            )
            for position, (kind, step_status) in enumerate(
                (("copy", "succeeded"), ("image", "succeeded"), ("video", "waiting"), ("store", "pending"))
            ):
                s.add(
                    Step(
                        id=f"st_{prefix}{i}_{position}",
                        pipeline_id=pid,
                        position=position,
                        kind=kind,
                        status=step_status,
                    )
                )
            s.flush()
            s.add(
                ProviderJob(
                    id=f"job_{prefix}{i}",
                    step_id=f"st_{prefix}{i}_2",
                    attempt=1,
                    idempotency_key=f"key-{prefix}{i}",
                    kind="video",
                    model=model,
                    task_id=task_id,
                    status=status,
                    units=6.0,
                    submitted_at=now - timedelta(seconds=SUBMITTED_AGO_S),
                    next_poll_at=now - timedelta(seconds=due_ago_s),
                )
            )
    return [f"job_{prefix}{i}" for i in range(len(task_ids))]


def _jobs(rt: Runtime) -> dict[str, ProviderJob]:
    with rt.db.transaction() as s:
        return {j.id: j for j in s.scalars(select(ProviderJob))}


def _polls_audited(rt: Runtime) -> list[ProviderCall]:
    with rt.db.transaction() as s:
        return list(s.scalars(select(ProviderCall).where(ProviderCall.operation == "poll")))


def _round(poller: Poller) -> int:
    async def go() -> int:
        try:
            return await poller.run_once()
        finally:
            await poller.aclose()

    return asyncio.run(go())


def test_a_round_on_postgres_leaves_every_job_and_the_audit_log_right(pg_rt: Runtime, sim: SimulatorHandle) -> None:
    rt = pg_rt
    long_ids = _seed(rt, _submit(rt, sim, 30, seconds=LONG_S, prefix="long"), prefix="long", due_ago_s=0.25)
    retry_tasks = _submit(rt, sim, 4, seconds=LONG_S, prefix="retry")
    retry_ids = _seed(rt, retry_tasks, prefix="retry")
    done_ids = _seed(rt, _submit(rt, sim, 5, seconds=0, prefix="done"), prefix="done")
    gone_ids = _seed(rt, ["task_the_provider_never_made"], prefix="gone")
    _faults(sim, *({"method": "GET", "path": f"/v1/tasks/{t}", "status": 503, "times": 1} for t in retry_tasks))
    everything = long_ids + retry_ids + done_ids + gone_ids

    due = {job_id: job.next_poll_at for job_id, job in _jobs(rt).items()}
    poller = Poller(rt)
    before = datetime.now(UTC)
    assert _round(poller) == len(everything)
    after = datetime.now(UTC)

    jobs = _jobs(rt)
    for job_id in long_ids:  # routine: the bulk update
        job = jobs[job_id]
        assert (job.status, job.progress, job.polls, job.lease_until) == ("pending", 0, 1, None)
        assert job.estimated_time_s == int(LONG_S)
        assert job.next_poll_at is not None
        # One interval after the poll was due (not after the round ended), unless that is less
        # than half an interval from when the answer was applied.
        cadence = due[job_id] + timedelta(seconds=INTERVAL_S)
        earliest = max(cadence, before + timedelta(seconds=INTERVAL_S / 2))
        latest = max(cadence, after + timedelta(seconds=INTERVAL_S / 2))
        assert earliest - timedelta(seconds=SLACK_S) <= job.next_poll_at <= latest + timedelta(seconds=SLACK_S)
    for job_id in retry_ids:  # a failed read: read again after the back-off, state kept
        job = jobs[job_id]
        assert (job.status, job.progress, job.polls, job.lease_until) == ("processing", 0, 1, None)
        assert job.next_poll_at is not None
        assert before + timedelta(seconds=2 * INTERVAL_S - SLACK_S) <= job.next_poll_at
        assert job.next_poll_at <= after + timedelta(seconds=2 * INTERVAL_S + SLACK_S)
    with rt.db.transaction() as s:
        for job_id in done_ids:  # ended: the job row, then the engine's finish_step
            job = s.get_one(ProviderJob, job_id)
            assert (job.status, job.progress, job.polls, job.lease_until, job.next_poll_at) == (
                "completed",
                100,
                1,
                None,
                None,
            )
            assert job.result and job.cost_usd > 0
            step = s.get_one(Step, job.step_id)
            assert step.status == "succeeded" and step.output and step.output["assets"]
            store = s.scalars(select(Step).where(Step.pipeline_id == step.pipeline_id, Step.position == 3)).one()
            assert store.status == "queued"
        gone = s.get_one(ProviderJob, gone_ids[0])
        assert (gone.status, gone.polls, gone.lease_until) == ("failed", 1, None)
        assert s.get_one(Step, gone.step_id).pipeline.status == "failed"
    nudged = []
    while (step_id := rt.dispatcher.pop()) is not None:  # type: ignore[attr-defined]
        nudged.append(step_id)
    assert sorted(nudged) == sorted(jobs[j].step_id[:-1] + "3" for j in done_ids)

    calls = _polls_audited(rt)  # one row per call, whatever its answer
    assert sorted(c.step_id or "" for c in calls) == sorted(jobs[j].step_id for j in everything)
    by_step = {c.step_id: c for c in calls}
    with rt.db.transaction() as s:
        for job_id in everything:
            job = jobs[job_id]
            call = by_step[job.step_id]
            pipeline = s.get_one(Step, job.step_id).pipeline
            assert (call.user_id, call.feature, call.pipeline_id, call.model) == (
                pipeline.user_id,
                pipeline.feature,
                pipeline.id,
                job.model,
            )
            expected_status = 503 if job_id in retry_ids else 404 if job_id in gone_ids else 200
            assert call.status_code == expected_status
            assert (call.cost_usd > 0) == (job_id in done_ids)
            assert call.ts.tzinfo is not None and before - timedelta(seconds=1) <= call.ts <= after
    assert len(poller.lateness_s) == len(everything)

    assert _round(Poller(rt)) == 0  # nothing is due any more
    assert len(_polls_audited(rt)) == len(everything)


def test_a_job_that_ends_or_is_cancelled_between_claim_and_apply_is_not_overwritten(
    pg_rt: Runtime, sim: SimulatorHandle
) -> None:
    rt = pg_rt
    long_ids = _seed(rt, _submit(rt, sim, 6, seconds=LONG_S, prefix="l"), prefix="l")
    done_ids = _seed(rt, _submit(rt, sim, 2, seconds=0, prefix="d"), prefix="d")
    poller = Poller(rt)
    claimed = poller.claim()
    assert {c.job_id for c in claimed} == set(long_ids + done_ids)
    cancelled = [long_ids[0], done_ids[0]]  # one answer routine, one an ending
    with rt.db.transaction() as s:  # what cancel_pipeline does to a job the provider stopped
        s.execute(
            update(ProviderJob)
            .where(ProviderJob.id.in_(cancelled))
            .values(status="cancelled", next_poll_at=None, error_code="cancelled")
        )

    async def poll_and_apply() -> None:
        try:
            answers = await poller.poll(claimed)
            await asyncio.to_thread(poller.apply, claimed, answers, poller.audit.drain())
        finally:
            await poller.aclose()

    asyncio.run(poll_and_apply())
    jobs = _jobs(rt)
    for job_id in cancelled:
        job = jobs[job_id]
        assert (job.status, job.next_poll_at, job.polls, job.error_code) == ("cancelled", None, 0, "cancelled")
    with rt.db.transaction() as s:
        assert s.get_one(Step, jobs[done_ids[0]].step_id).status == "waiting"  # not completed by the late answer
    assert jobs[done_ids[1]].status == "completed"
    for job_id in long_ids[1:]:
        assert (jobs[job_id].polls, jobs[job_id].lease_until, jobs[job_id].status) == (1, None, "pending")
    assert len(_polls_audited(rt)) == len(claimed)  # the calls were made: each one is in the log


def test_the_running_poller_on_postgres_sees_jobs_through_to_their_end(pg_rt: Runtime, sim: SimulatorHandle) -> None:
    rt = pg_rt
    rt.settings = rt.settings.with_overrides(poll_interval_s=0.05)
    _sim_config(sim, video_seconds=0.3)
    model = rt.catalog.profiles["standard"].video_models[0]
    tasks = asyncio.run(create_tasks(sim.base_url, TEST_KEY, 20, model=model, prefix="run"))
    job_ids = _seed(rt, tasks, prefix="run")

    async def scenario() -> dict[str, str]:
        poller = Poller(rt)
        stop = asyncio.Event()
        running = asyncio.create_task(poller.run(stop, sweep_every_s=3600))
        statuses: dict[str, str] = {}
        for _ in range(300):  # until every job has ended (or give up after many tries)
            await asyncio.sleep(0.1)
            statuses = {j.id: j.status for j in (await asyncio.to_thread(_jobs, rt)).values()}
            if all(v == "completed" for v in statuses.values()):
                break
        stop.set()
        await running
        return statuses

    statuses = asyncio.run(scenario())
    assert statuses == {j: "completed" for j in job_ids}
    calls = _polls_audited(rt)
    jobs = _jobs(rt)
    assert len(calls) == sum(j.polls for j in jobs.values())  # one audit row per poll, no more, no less
    assert all(j.lease_until is None for j in jobs.values())


# on time: 3 rounds of ~0.06 s, so the last claim's earliest job is well under the 0.5 s mark
@pytest.mark.parametrize(("due_ago_s", "jobs", "behind"), [(1.0, 30, True), (0.0, 12, False)])
def test_behind_schedule_the_next_round_is_claimed_while_this_one_is_read_and_no_job_is_read_twice(
    pg_rt: Runtime, sim: SimulatorHandle, due_ago_s: float, jobs: int, behind: bool
) -> None:
    rt = pg_rt
    rt.settings = rt.settings.with_overrides(poller_batch=4)  # more due jobs than that: claims come back full
    tasks = _submit(rt, sim, jobs, seconds=LONG_S, prefix="ahead")
    job_ids = _seed(rt, tasks, prefix="ahead", due_ago_s=due_ago_s)
    poller = Poller(rt)
    reading = False
    claims_during_reads = 0
    claim, poll = poller.claim, poller.poll

    def watched_claim() -> list[Any]:
        nonlocal claims_during_reads
        claims_during_reads += reading
        return claim()

    async def watched_poll(claimed: list[Any]) -> list[Any]:
        nonlocal reading
        reading = True
        try:
            await asyncio.sleep(0.05)  # a slow provider: the claim taken ahead has time to land
            return await poll(claimed)
        finally:
            reading = False

    poller.claim = watched_claim  # type: ignore[method-assign]
    poller.poll = watched_poll  # type: ignore[method-assign]

    async def scenario() -> None:
        stop = asyncio.Event()
        running = asyncio.create_task(poller.run(stop, sweep_every_s=3600))
        for _ in range(100):  # well inside the 2 s cadence: each job is due once in this test
            await asyncio.sleep(0.05)
            if all(j.polls for j in (await asyncio.to_thread(_jobs, rt)).values()):
                break
        stop.set()
        await running

    asyncio.run(scenario())
    jobs = _jobs(rt)
    assert {j: jobs[j].polls for j in job_ids} == {j: 1 for j in job_ids}
    assert all(j.lease_until is None for j in jobs.values())
    assert len(_polls_audited(rt)) == len(job_ids)
    if behind:  # a second late (half a cadence): rounds overlap, claims taken while reads are in flight
        assert claims_during_reads >= 3
    else:  # on time: each round is claimed when the last one's reads are done, so none is held back
        assert claims_during_reads == 0


def test_a_poller_that_stops_behind_schedule_gives_back_the_round_it_claimed_ahead(
    pg_rt: Runtime, sim: SimulatorHandle
) -> None:
    rt = pg_rt
    rt.settings = rt.settings.with_overrides(poller_batch=4)
    job_ids = _seed(rt, _submit(rt, sim, 12, seconds=LONG_S, prefix="stop"), prefix="stop")
    poller = Poller(rt)
    stop = asyncio.Event()
    poll = poller.poll

    async def first_round_then_stop(claimed: list[Any]) -> list[Any]:
        await asyncio.sleep(0.1)  # the claim taken ahead lands meanwhile
        stop.set()
        return await poll(claimed)

    poller.poll = first_round_then_stop  # type: ignore[method-assign]
    asyncio.run(poller.run(stop, sweep_every_s=3600))
    jobs = _jobs(rt)
    read = [j for j in job_ids if jobs[j].polls]
    assert len(read) == 4  # one round was read
    assert all(jobs[j].lease_until is None for j in job_ids)  # the one claimed ahead was given back
    assert Poller(rt).claim()  # and is there for the next poller at once, not after its lease


def test_audit_rows_by_copy_are_the_rows_an_insert_writes(pg_rt: Runtime) -> None:
    from decimal import Decimal
    from zoneinfo import ZoneInfo

    from genline.pipelines.audit import _COPY_TYPES, audit_row, write_audit, write_audit_many
    from genline.provider.gateway import CallContext, CallRecord

    def records(pipeline_id: str) -> list[CallRecord]:
        ctx = CallContext("user-1", "listing", pipeline_id, "st_x", "wan-2.7-image")
        bare = CallContext(pipeline_id=pipeline_id)  # every other field NULL
        odd = CallContext("usér\tone\nline", "fête", pipeline_id, "st_y", "sora-2")  # tabs, newlines, not ASCII
        at = datetime(2026, 11, 27, 8, 0, 1, 123456, tzinfo=UTC)
        berlin = datetime(2026, 11, 27, 9, 0, 2, tzinfo=ZoneInfo("Europe/Berlin"))  # not UTC: converted
        return [
            CallRecord(ctx, "poll", at, latency_ms=1.25, status_code=200, request_id="req_1"),
            CallRecord(ctx, "poll", berlin, status_code=503, error_code="provider_unavailable"),
            CallRecord(ctx, "poll", at, status_code=200, units=5.0, cost_usd=Decimal("0.123456")),
            CallRecord(bare, "chat", at, prompt_tokens=12, completion_tokens=34, cost_usd=Decimal("0.000017")),
            CallRecord(odd, "submit", at, latency_ms=3, status_code=400, error_code="bad\\req", units=8),  # ints
        ]

    with pg_rt.db.transaction() as s:
        write_audit(s, records("pl_insert"))
        write_audit_many(s, records("pl_copy"))
    columns = [c.key for c in ProviderCall.__table__.columns if c.key not in ("id", "pipeline_id")]
    with pg_rt.db.transaction() as s:
        rows = s.scalars(select(ProviderCall).order_by(ProviderCall.id)).all()
        by = {
            p: [tuple(getattr(r, c) for c in columns) for r in rows if r.pipeline_id == p]
            for p in ("pl_insert", "pl_copy")
        }
    assert len(by["pl_insert"]) == 5
    assert by["pl_copy"] == by["pl_insert"]
    assert [name for name, _ in _COPY_TYPES] == list(audit_row(records("pl")[0]))  # no column left out
    assert by["pl_copy"][1][0] == datetime(2026, 11, 27, 8, 0, 2, tzinfo=UTC)  # ts, back in UTC


# --- the HTTP/1.1 reader ---------------------------------------------------------------------------
Reply = Callable[[str, int], Awaitable[tuple[bytes, bool]]]  # (path, nth request on this connection) -> (bytes, close?)


class ScriptedServer:
    """A bare TCP server answering each request with bytes the test chooses."""

    def __init__(self, reply: Reply, tls: ssl.SSLContext | None = None) -> None:
        self.reply = reply
        self.tls = tls
        self.connections = 0
        self.requests: list[str] = []
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> ScriptedServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        for w in self.writers:
            w.close()
        self.server.close()

    @property
    def base_url(self) -> str:
        assert self.server is not None
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        nth = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode()
                self.requests.append(head.decode("latin-1"))
                data, close = await self.reply(path, nth)
                nth += 1
                writer.write(data)
                await writer.drain()
                if close:
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


def _task_id(path: str) -> str:
    return unquote(path.removeprefix("/v1/tasks/"))


def _task_body(task_id: str, status: str = "processing") -> bytes:
    return json.dumps({"code": 200, "data": {"id": task_id, "status": status, "progress": 42}}).encode()


def _ok(body: bytes, *headers: str) -> bytes:
    head = ["HTTP/1.1 200 OK", "Content-Type: application/json", *headers]
    if not any(h.lower().startswith(("content-length", "transfer-encoding")) for h in headers):
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def _reader(make_settings: Callable[..., Settings], base_url: str, **env: str) -> HttpTaskReader:
    return HttpTaskReader(make_settings(base_url, **env), max_connections=4)


def test_the_reader_reads_length_chunked_close_delimited_and_compressed_answers(
    make_settings: Callable[..., Settings],
) -> None:
    async def reply(path: str, nth: int) -> tuple[bytes, bool]:
        task_id = _task_id(path)
        body = _task_body(task_id)
        if task_id == "chunked":
            chunks = [body[:7], body[7:20], body[20:]]
            data = (
                b"".join(f"{len(c):x};ext=1\r\n".encode() + c + b"\r\n" for c in chunks) + b"0\r\nX-Trailer: t\r\n\r\n"
            )
            return _ok(data, "Transfer-Encoding: chunked", "X-REQUEST-ID: req-chunked"), False
        if task_id == "until-close":
            return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + body, True
        if task_id == "gzipped":
            return _ok(gzip.compress(body), "Content-Encoding: gzip"), False
        if task_id == "interim":
            return b"HTTP/1.1 100 Continue\r\n\r\n" + _ok(body), False
        return _ok(body, "x-ratelimit-remaining: 17", "X-Request-Id: req-plain"), False

    async def scenario() -> None:
        async with ScriptedServer(reply) as server:
            reader = _reader(make_settings, server.base_url)
            try:
                state, answer = await reader.get_task("plain")
                assert (state.task_id, state.status, state.progress) == ("plain", "processing", 42)
                assert (answer.status_code, answer.request_id, answer.ratelimit_remaining) == (200, "req-plain", 17)
                for task_id in ("chunked", "until-close", "gzipped", "interim", "plain"):
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
        task_id = _task_id(path)
        if task_id == "dropped" and nth > 0:
            return b"", True  # a keep-alive connection the server closes as the request arrives
        if task_id == "then-close":
            return _ok(_task_body(task_id), "Connection: close"), False  # says close, leaves it to us
        return _ok(_task_body(task_id)), task_id == "closed-after"

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
        task_id = _task_id(path)
        if task_id == "slow":
            await asyncio.sleep(5)
        if task_id == "missing":
            body = b'{"error": {"message": "No such task.", "code": "task_not_found"}}'
            return b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\nx-request-id: r404\r\n\r\n" % len(
                body
            ) + body, False
        if task_id == "not-json":
            return _ok(b"<html>gateway</html>"), False
        if task_id == "not-http":
            return b"SSH-2.0-OpenSSH\r\n\r\n", False
        return _ok(_task_body(task_id)), False

    async def scenario() -> None:
        async with ScriptedServer(reply) as server:
            reader = _reader(make_settings, server.base_url, GENLINE_HTTP_TIMEOUT_S="0.2")
            try:
                with pytest.raises(ProviderNotFound) as not_found:
                    await reader.get_task("missing")
                assert not_found.value.answer.request_id == "r404"  # type: ignore[attr-defined]
                with pytest.raises(ProviderBadResponse):
                    await reader.get_task("not-json")
                with pytest.raises(ProviderConnectionError):
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
        return _ok(_task_body(_task_id(path))), False

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


def _self_signed(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a certificate for 127.0.0.1, and a client context that trusts it."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    client = ssl.create_default_context(cadata=cert_pem.decode())
    return server, client


def test_the_reader_speaks_tls_and_checks_the_certificate(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    server_tls, client_tls = _self_signed(tmp_path)

    async def reply(path: str, nth: int) -> tuple[bytes, bool]:
        return _ok(_task_body(_task_id(path))), False

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
    from genline.provider.poll_client import AiohttpTaskReader, HttpTaskReader, make_task_reader

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
