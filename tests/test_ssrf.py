"""SSRF, three ways: genline reaches only public addresses (or those GENLINE_ALLOW_PRIVATE_HOSTS
names) when it downloads a provider's result, POSTs a callback, or takes a user's image URL; every
redirect hop is checked again; downloads have a size limit and an overall deadline.

The "internal" servers listen on 127.0.0.2 (loopback, like 127.0.0.1, but not in the tests'
allow-list, which names the simulator's 127.0.0.1 only); a "public" one listens on 127.0.0.1 and
plays the CDN that redirects inwards. Each server counts what reached it: a refused URL must
leave its count at zero."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from genline.config.clock import utcnow
from genline.config.errors import ConfigError, RetryableStorageError, StorageError
from genline.config.settings import Settings, load_settings
from genline.pipelines.api import Genline
from genline.pipelines.engine import notify_callback, run_step
from genline.pipelines.runtime import Runtime
from genline.provider import name_resolution, safe_http
from genline.provider.name_resolution import ResolveCache
from genline.provider.safe_http import (
    STRICT,
    AddressPolicy,
    DownloadLimit,
    SafeClient,
    UnsafeURL,
    check_url,
)
from genline.provider.simulator import SimulatorHandle
from genline.provider.simulator.media import png_bytes
from genline.storage.local import LocalObjectStore
from genline.storage.migrate import upgrade
from genline.storage.models import Pipeline, Step
from genline.storage.transfer import copy_url_to_store
from tests.support.drive import output_of, run_until, sim_stats
from tests.support.refusal import refused

RequestFn = Callable[..., dict[str, Any]]
PNG = png_bytes(b"internal", 16)
LOOPBACK_ONLY = AddressPolicy.from_entries([ip_network("127.0.0.1/32")])


# --- servers that count what reaches them -----------------------------------------------------------
class Server:
    """A threaded HTTP server on ``host`` whose answers a test scripts per path."""

    def __init__(self, host: str) -> None:
        self.hits: list[tuple[str, str, str]] = []  # (method, path, Host header)
        self.routes: dict[str, Callable[[BaseHTTPRequestHandler], None]] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self) -> None:
                server.hits.append((self.command, self.path, self.headers.get("Host", "")))
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                route = server.routes.get(self.path.split("?")[0])
                if route is None:
                    _send(self, 200, PNG, "image/png")  # "the internal page"
                else:
                    route(self)

            do_GET = do_POST = _any  # noqa: N815  # the http.server API

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://{host}:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def redirect(self, path: str, to: str, status: int = 302) -> str:
        def answer(h: BaseHTTPRequestHandler) -> None:
            h.send_response(status)
            h.send_header("Location", to)
            h.send_header("Content-Length", "0")
            h.end_headers()

        self.routes[path] = answer
        return self.base_url + path

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _send(h: BaseHTTPRequestHandler, status: int, body: bytes, content_type: str) -> None:
    h.send_response(status)
    h.send_header("Content-Type", content_type)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


@pytest.fixture
def internal() -> Iterator[Server]:
    server = Server("127.0.0.2")
    yield server
    server.close()


@pytest.fixture
def public() -> Iterator[Server]:
    server = Server("127.0.0.1")  # allowed in the tests, like a public CDN
    yield server
    server.close()


@pytest.fixture
def strict_rt(sim: SimulatorHandle, make_settings: Callable[..., Settings]) -> Iterator[Runtime]:
    """A runtime with the shipped default: nothing private allowed, not even the simulator."""
    settings = make_settings(sim.base_url, GENLINE_ALLOW_PRIVATE_HOSTS="")
    upgrade(settings.database_url)
    runtime = Runtime.from_settings(settings)
    yield runtime
    runtime.close()


@pytest.fixture
def store(tmp_path: Path) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "objects")


@pytest.fixture(autouse=True)
def _forget_submit_resolutions() -> Iterator[None]:
    """Each test controls its own DNS (``_resolve_as``): none sees what an earlier one's submits
    remembered in the process-wide ``SUBMIT_RESOLUTIONS``."""
    name_resolution.SUBMIT_RESOLUTIONS.clear()
    yield
    name_resolution.SUBMIT_RESOLUTIONS.clear()


# --- (c) a user's URLs, at submit -------------------------------------------------------------------
PRIVATE_SPELLINGS = [
    "http://127.0.0.1/mug.png",
    "http://127.1/mug.png",
    "http://2130706433/mug.png",  # decimal
    "http://0x7f000001/mug.png",  # hex
    "http://0x7f.0.0.1/mug.png",
    "http://017700000001/mug.png",  # octal
    "http://0177.0.0.1/mug.png",
    "http://0/mug.png",
    "http://0.0.0.0/mug.png",
    "http://[::1]/mug.png",
    "http://[::]/mug.png",
    "http://[::ffff:127.0.0.1]/mug.png",  # IPv4-mapped IPv6
    "http://[::ffff:7f00:1]/mug.png",
    "http://[::ffff:169.254.169.254]/latest/meta-data/",
    "http://[::127.0.0.1]/mug.png",  # IPv4-compatible
    "http://[64:ff9b::a9fe:a9fe]/mug.png",  # NAT64 of 169.254.169.254
    "http://[2002:7f00:1::]/mug.png",  # 6to4 of 127.0.0.1
    "http://169.254.169.254/latest/meta-data/iam/",
    "http://[fd00:ec2::254]/latest/meta-data/",
    "http://[fd12:3456::1]/mug.png",
    "http://[fe80::1]/mug.png",
    "http://[fe80::1%25eth0]/mug.png",
    "http://10.0.0.1/mug.png",
    "http://172.16.0.1/mug.png",
    "http://192.168.1.1/mug.png",
    "http://100.64.0.1/mug.png",
    "http://224.0.0.1/mug.png",
    "http://255.255.255.255/mug.png",
    "http://localhost/mug.png",
    "http://localhost./mug.png",
    "http://LOCALHOST:8080/mug.png",
    "http://shop.localhost/mug.png",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://metadata/computeMetadata/v1/",
    "http://printer.local/mug.png",
    "HTTP://127.0.0.1/mug.png",  # schemes compared case-insensitively
    "hTTpS://[::1]/mug.png",
    "http://127.0.0.1\\@cdn.example.com/mug.png",  # parsers disagree: refused, not guessed at
    "http://%6c%6fcalhost.example/mug.png",
]


@pytest.mark.parametrize("url", PRIVATE_SPELLINGS)
def test_a_user_image_url_to_a_private_address_is_refused_whatever_its_spelling(
    strict_rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn, url: str
) -> None:
    err = refused(strict_rt, sim, lambda: Genline(runtime=strict_rt).submit(request_fields(image=url)))
    assert err.field == "image" and err.code in ("image_not_public", "image_invalid_url"), err.to_dict()


@pytest.mark.parametrize(
    "url", ["http://169.254.169.254/latest/meta-data/", "http://2130706433/hook", "http://[fd00:ec2::254]/hook"]
)
def test_a_callback_url_to_a_private_address_is_refused(
    strict_rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn, url: str
) -> None:
    err = refused(strict_rt, sim, lambda: Genline(runtime=strict_rt).submit(request_fields(callback_url=url)))
    assert (err.code, err.field) == ("callback_url_not_public", "callback_url")


@pytest.mark.parametrize("field", ["image", "callback_url"])
@pytest.mark.parametrize(
    "url", ["https://seller:hunter2secret@cdn.example.com/mug.png", "https://cdn.example.com@127.0.0.1/mug.png"]
)
def test_a_url_with_credentials_is_refused_without_repeating_them(
    strict_rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn, field: str, url: str
) -> None:
    err = refused(strict_rt, sim, lambda: Genline(runtime=strict_rt).submit(request_fields(**{field: url})))
    assert (err.code, err.field) == (f"{field}_has_credentials", field)
    assert "hunter2secret" not in err.message and "seller" not in err.message


def test_a_non_http_scheme_is_refused_and_the_url_not_repeated(
    strict_rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn
) -> None:
    url = "ftp://seller:hunter2secret@cdn.example.com/mug.png"
    err = refused(strict_rt, sim, lambda: Genline(runtime=strict_rt).submit(request_fields(callback_url=url)))
    assert err.code == "callback_url_not_http" and "hunter2secret" not in err.message


@pytest.mark.parametrize(
    "url",
    [
        "https://cdn.example.com/mug.jpg",  # does not resolve from here: the provider fetches it, not us
        "HTTPS://CDN.Example.com/Mug.JPG",
        "https://images.example.com./mug.jpg",
        "http://8.8.8.8/mug.png",  # a public address
        "https://bücher.example/mug.png",
    ],
)
def test_public_or_unresolvable_image_urls_are_accepted(
    strict_rt: Runtime, request_fields: RequestFn, url: str
) -> None:
    accepted = Genline(runtime=strict_rt).submit(request_fields(image=url))
    assert accepted.created


def test_a_name_that_resolves_to_a_private_address_is_refused_at_submit(
    strict_rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    _resolve_as(monkeypatch, {"cdn.attacker.example": [["93.184.216.34", "10.1.2.3"]]})
    url = "https://cdn.attacker.example/mug.png"
    err = refused(strict_rt, sim, lambda: Genline(runtime=strict_rt).submit(request_fields(image=url)))
    assert err.code == "image_not_public" and "private" in err.message


def test_an_address_on_the_allow_list_is_accepted(rt: Runtime, public: Server, request_fields: RequestFn) -> None:
    # rt's settings allow 127.0.0.1 (the simulator): an image or callback there is accepted
    fields = request_fields(image=public.base_url + "/mug.png", callback_url=public.base_url + "/hook")
    assert Genline(runtime=rt).submit(fields).created
    assert public.hits == []  # validation resolves; it never fetches


def _resolve_as(monkeypatch: pytest.MonkeyPatch, table: dict[str, list[list[str]]]) -> list[str]:
    """DNS the test controls: ``socket.getaddrinfo`` answers a name of ``table`` with its answers in
    turn (the last one from then on; an empty answer is "no such name"). Every name asked is
    recorded, in order. A fake is the right tool here: this machine's DNS cannot be made to answer
    a chosen name, and whether the resolver was asked at all is the thing some tests check."""
    asked: list[str] = []
    real = socket.getaddrinfo

    def fake(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name not in table:
            return real(host, port, *args, **kwargs)
        asked.append(name)
        answers = table[name]
        addresses = answers.pop(0) if len(answers) > 1 else answers[0]
        if not addresses:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port or 0))
            for a in addresses
        ]

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return asked


# --- (a) the provider's result links ------------------------------------------------------------------
def _tamper_image_link(rt: Runtime, pipeline_id: str, url: str, expires_in_s: float) -> None:
    with rt.db.transaction() as s:
        image = s.scalars(select(Step).where(Step.pipeline_id == pipeline_id, Step.kind == "image")).one()
        assert image.output is not None
        asset = {**image.output["assets"][0], "url": url}
        asset["expires_at"] = (utcnow() + timedelta(seconds=expires_in_s)).isoformat()
        image.output = {**image.output, "assets": [asset]}


@pytest.mark.parametrize("how", ["direct", "redirect"])
def test_a_result_link_to_an_internal_address_is_neither_fetched_nor_handed_on(
    rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn, internal: Server, public: Server, how: str
) -> None:
    pid = Genline(runtime=rt).submit(request_fields()).pipeline_id
    video_step = run_until(rt, "video")
    secret = internal.base_url + "/admin/secret"
    link = secret if how == "direct" else public.redirect("/cdn/image.png", secret)
    _tamper_image_link(rt, pid, link, 60)  # close to its end: the video step copies it first
    run_step(rt, video_step)
    status = Genline(runtime=rt).status(pid)
    assert status["status"] == "failed" and status["error"]["code"] == "result_link_blocked", status
    assert internal.hits == []  # never fetched
    assert sim_stats(sim)["jobs_total"] == 1  # and no video rendered from it
    assert "admin" not in status["error"]["message"]


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_every_redirect_hop_is_checked_again(
    store: LocalObjectStore, internal: Server, public: Server, status: int
) -> None:
    link = public.redirect("/r", internal.base_url + "/video.mp4", status)
    with SafeClient(LOOPBACK_ONLY) as http, pytest.raises(StorageError) as caught:
        copy_url_to_store(http, store, link, "k/video.mp4", expires_at=None, expect_type="video")
    assert caught.value.code == "result_link_blocked"
    assert [h[1] for h in public.hits] == ["/r"] and internal.hits == []


@pytest.mark.parametrize(
    "target",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:127.0.0.2]/",
        "http://2130706434/",
        "http://localhost./",
        "http://user:pw@cdn.example.com/",
        "file:///etc/passwd",
        "gopher://127.0.0.2:6379/_INFO",
    ],
)
def test_a_redirect_to_any_refused_target_is_not_followed(
    store: LocalObjectStore, internal: Server, public: Server, target: str
) -> None:
    link = public.redirect("/r", target, 307)
    with SafeClient(LOOPBACK_ONLY) as http, pytest.raises(StorageError) as caught:
        copy_url_to_store(http, store, link, "k/image.png", expires_at=None, expect_type="image")
    assert caught.value.code in ("result_link_blocked", "result_link_refused"), caught.value.to_dict()
    assert "pw" not in caught.value.message
    assert internal.hits == []


def test_a_redirect_loop_ends_at_the_hop_limit(store: LocalObjectStore, public: Server) -> None:
    link = public.redirect("/loop", "/loop")
    with SafeClient(LOOPBACK_ONLY) as http, pytest.raises(StorageError) as caught:
        copy_url_to_store(http, store, link, "k/image.png", expires_at=None, expect_type="image")
    assert caught.value.code == "result_link_refused"
    assert len(public.hits) == safe_http.MAX_REDIRECTS + 1


def test_the_name_is_resolved_once_and_the_connection_pinned_to_what_was_checked(
    store: LocalObjectStore, public: Server, internal: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: the first answer is the allowed address, every later one an internal address.
    genline asks once and connects to the first answer; the Host header is the name."""
    port = public.base_url.rsplit(":", 1)[1]
    asked = _resolve_as(monkeypatch, {"cdn.rebind.example": [["127.0.0.1"], ["127.0.0.2"]]})
    policy = AddressPolicy.from_entries([ip_network("127.0.0.1/32")])
    with SafeClient(policy) as http:
        info = copy_url_to_store(
            http, store, f"http://cdn.rebind.example:{port}/a.png", "k/a.png", expires_at=None, expect_type="image"
        )
    assert info.size == len(PNG)
    assert asked == ["cdn.rebind.example"]
    assert public.hits == [("GET", "/a.png", f"cdn.rebind.example:{port}")] and internal.hits == []


def test_a_name_resolving_to_an_internal_address_is_not_connected_to(
    store: LocalObjectStore, internal: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = internal.base_url.rsplit(":", 1)[1]
    _resolve_as(monkeypatch, {"cdn.evil.example": [["127.0.0.2"]]})
    with SafeClient(LOOPBACK_ONLY) as http, pytest.raises(StorageError) as caught:
        copy_url_to_store(
            http, store, f"http://cdn.evil.example:{port}/a.png", "k/a.png", expires_at=None, expect_type="image"
        )
    assert caught.value.code == "result_link_blocked" and "loopback" in caught.value.message
    assert internal.hits == []


def test_the_allow_list_lets_the_simulator_through_and_nothing_else(
    rt: Runtime, strict_rt: Runtime, sim: SimulatorHandle, request_fields: RequestFn, store: LocalObjectStore
) -> None:
    pid = Genline(runtime=rt).submit(request_fields()).pipeline_id
    run_until(rt, "video")
    link = output_of(rt, pid, "image")["assets"][0]["url"]
    assert link.startswith("http://127.0.0.1:")
    with pytest.raises(StorageError) as caught:  # the shipped default: loopback refused
        copy_url_to_store(strict_rt.downloads, store, link, "k/strict.png", expires_at=None, expect_type="image")
    assert caught.value.code == "result_link_blocked"
    info = copy_url_to_store(rt.downloads, store, link, "k/allowed.png", expires_at=None, expect_type="image")
    assert info.content_type.startswith("image/")


# --- (b) callbacks ----------------------------------------------------------------------------------
def test_a_callback_follows_no_redirect(
    rt: Runtime, request_fields: RequestFn, public: Server, internal: Server
) -> None:
    hook = public.redirect("/hook", internal.base_url + "/internal/admin", 307)
    pid = Genline(runtime=rt).submit(request_fields(callback_url=hook)).pipeline_id
    notify_callback(rt, pid)
    assert [h[:2] for h in public.hits] == [("POST", "/hook")]
    assert internal.hits == []


def test_a_callback_whose_address_turned_private_is_not_posted(
    rt: Runtime, request_fields: RequestFn, internal: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Accepted at submit (its name did not resolve then), private when the pipeline ends."""
    port = internal.base_url.rsplit(":", 1)[1]
    pid = Genline(runtime=rt).submit(request_fields(callback_url=f"http://hooks.later.example:{port}/h")).pipeline_id
    _resolve_as(monkeypatch, {"hooks.later.example": [["127.0.0.2"]]})
    notify_callback(rt, pid)
    assert internal.hits == []
    with rt.db.transaction() as s:  # a failed callback changes nothing: best effort, logged
        assert s.get_one(Pipeline, pid).callback_url is not None


def test_a_callback_to_the_metadata_address_is_not_posted_even_if_stored(
    rt: Runtime, request_fields: RequestFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid = Genline(runtime=rt).submit(request_fields()).pipeline_id
    with rt.db.transaction() as s:
        s.get_one(Pipeline, pid).callback_url = "http://169.254.169.254/latest/meta-data/"
    connects: list[Any] = []
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: connects.append(a))
    notify_callback(rt, pid)
    assert connects == []


# --- limits: size and overall deadline ----------------------------------------------------------------
def _stream_route(server: Server, path: str, *, chunk: bytes, pause_s: float, content_type: str) -> str:
    """An endless chunked body, ``chunk`` every ``pause_s`` seconds, until the client goes."""

    def answer(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", content_type)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        try:
            while True:
                h.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                h.wfile.flush()
                if pause_s:
                    time.sleep(pause_s)
        except OSError:
            return

    server.routes[path] = answer
    return server.base_url + path


def test_an_endless_body_is_cut_off_at_the_size_limit(store: LocalObjectStore, public: Server) -> None:
    link = _stream_route(public, "/endless.png", chunk=b"\0" * 65536, pause_s=0, content_type="image/png")
    with SafeClient(LOOPBACK_ONLY) as http:  # the shipped image limit: 20 MiB in 120 s
        assert http.download_limits["image"].max_bytes == 20 * 1024 * 1024
        started = time.monotonic()
        with pytest.raises(StorageError) as caught:
            copy_url_to_store(http, store, link, "k/endless.png", expires_at=None, expect_type="image")
        took = time.monotonic() - started
    assert caught.value.code == "result_too_large" and not caught.value.retryable
    assert took < 10, took
    assert not list((store.root).rglob("*.png")), "nothing half-written is kept"


def test_a_dripping_body_is_cut_off_at_the_deadline(store: LocalObjectStore, public: Server) -> None:
    link = _stream_route(public, "/drip.mp4", chunk=b"x", pause_s=0.2, content_type="video/mp4")
    limits = {"video": DownloadLimit(2048 * 1024 * 1024, 1.5)}
    with SafeClient(LOOPBACK_ONLY, limits=limits) as http:
        started = time.monotonic()
        with pytest.raises(RetryableStorageError) as caught:
            copy_url_to_store(http, store, link, "k/drip.mp4", expires_at=None, expect_type="video")
        took = time.monotonic() - started
    assert caught.value.code == "result_download_too_slow"
    assert 1.4 < took < 2.5, took


def test_dripping_headers_are_cut_off_at_the_deadline_not_at_the_read_timeout(store: LocalObjectStore) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            while not stop.is_set():
                try:
                    conn.sendall(b"X-Drip: 1\r\n")
                except OSError:
                    return
                time.sleep(0.2)

    threading.Thread(target=serve, daemon=True).start()
    link = f"http://127.0.0.1:{listener.getsockname()[1]}/slow.png"
    limits = {"image": DownloadLimit(20 * 1024 * 1024, 1.0)}
    try:
        with SafeClient(LOOPBACK_ONLY, limits=limits, timeout=30.0) as http:
            started = time.monotonic()
            with pytest.raises(RetryableStorageError) as caught:
                copy_url_to_store(http, store, link, "k/slow.png", expires_at=None, expect_type="image")
            took = time.monotonic() - started
    finally:
        stop.set()
        listener.close()
    assert caught.value.code == "result_download_too_slow"
    assert took < 2.0, took


def test_a_declared_size_over_the_limit_is_refused_before_reading(store: LocalObjectStore, public: Server) -> None:
    def answer(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "video/mp4")
        h.send_header("Content-Length", str(3 * 1024**3))
        h.end_headers()
        h.wfile.write(b"\0" * 1024)

    public.routes["/huge.mp4"] = answer
    with SafeClient(LOOPBACK_ONLY) as http, pytest.raises(StorageError) as caught:
        copy_url_to_store(
            http, store, public.base_url + "/huge.mp4", "k/huge.mp4", expires_at=None, expect_type="video"
        )
    assert caught.value.code == "result_too_large" and "2048 MiB" in caught.value.message


def test_the_limits_come_from_the_settings(make_settings: Callable[..., Settings], sim: SimulatorHandle) -> None:
    settings = make_settings(
        sim.base_url,
        GENLINE_MAX_IMAGE_DOWNLOAD_MB="1.5",
        GENLINE_VIDEO_DOWNLOAD_DEADLINE_S="30",
    )
    rt = Runtime.from_settings(settings)
    try:
        http = rt.downloads
        assert isinstance(http, SafeClient)
        assert http.download_limits["image"] == DownloadLimit(int(1.5 * 1024 * 1024), 120.0)
        assert http.download_limits["video"] == DownloadLimit(2048 * 1024 * 1024, 30.0)
    finally:
        rt.close()


# --- the setting ----------------------------------------------------------------------------------
def test_the_allow_list_is_parsed_into_names_and_networks(tmp_path: Path) -> None:
    s = load_settings(
        {"GENLINE_VAR_DIR": str(tmp_path), "GENLINE_ALLOW_PRIVATE_HOSTS": "127.0.0.1, 10.0.0.0/8,[::1],MinIO.Internal."}
    )
    assert s.allow_private_hosts == (
        ip_network("127.0.0.1/32"),
        ip_network("10.0.0.0/8"),
        ip_network("::1/128"),
        "minio.internal",
    )
    assert load_settings({"GENLINE_VAR_DIR": str(tmp_path)}).allow_private_hosts == ()
    policy = AddressPolicy.from_entries(s.allow_private_hosts)
    check_url("http://minio.internal:9000/bucket/x", policy)
    check_url("http://10.2.3.4/x", policy)
    check_url("http://[::ffff:10.2.3.4]/x", policy)
    with pytest.raises(UnsafeURL):
        check_url("http://192.168.0.1/x", policy)


@pytest.mark.parametrize(
    "entry", ["http://127.0.0.1", "127.0.0.1:8750", "10.0.0.1/8", "*.internal", "2130706433", "a b", "10.0.0.0/33"]
)
def test_an_invalid_allow_list_entry_stops_start_up(tmp_path: Path, entry: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"GENLINE_VAR_DIR": str(tmp_path), "GENLINE_ALLOW_PRIVATE_HOSTS": entry})
    assert "GENLINE_ALLOW_PRIVATE_HOSTS" in caught.value.message


def test_the_strict_policy_refuses_what_a_plain_client_would_fetch(public: Server) -> None:
    with SafeClient(STRICT) as http, pytest.raises(UnsafeURL):
        http.get(public.base_url + "/x")
    assert public.hits == []
    assert httpx.get(public.base_url + "/x").status_code == 200  # it is there: only genline's client refuses


def test_localhost_is_reached_only_where_its_addresses_are_allowed(public: Server, store: LocalObjectStore) -> None:
    """``APIMART_BASE_URL=http://localhost:8750`` makes the simulator's links name localhost too."""
    port = public.base_url.rsplit(":", 1)[1]
    link = f"http://localhost:{port}/a.png"
    with SafeClient(LOOPBACK_ONLY) as http:
        info = copy_url_to_store(http, store, link, "k/a.png", expires_at=None, expect_type="image")
    assert info.size == len(PNG)
    with SafeClient(STRICT) as http, pytest.raises(StorageError) as caught:
        copy_url_to_store(http, store, link, "k/b.png", expires_at=None, expect_type="image")
    assert caught.value.code == "result_link_blocked"
    check_url("http://localhost:8750/x", LOOPBACK_ONLY)
    with pytest.raises(UnsafeURL):
        check_url("http://localhost.:8750/x", LOOPBACK_ONLY)  # does not resolve here: a local name all the same


# --- submit-time resolutions are remembered; connects resolve every time ------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_second_submit_of_the_same_host_does_not_ask_the_resolver_again(
    strict_rt: Runtime, request_fields: RequestFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = _resolve_as(monkeypatch, {"cdn.shop.example": [["93.184.216.34"]], "img.gone.example": [[]]})
    genline = Genline(runtime=strict_rt)
    for url in ["https://cdn.shop.example/a.png", "https://CDN.Shop.example/b.png", "https://img.gone.example/c.png"]:
        assert genline.submit(request_fields(image=url)).created
        assert genline.submit(request_fields(image=url)).created
    assert asked == ["cdn.shop.example", "img.gone.example"]  # an answer and a "no such name", once each


def test_a_remembered_private_answer_is_still_refused_and_the_policy_applies_per_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked = _resolve_as(monkeypatch, {"cdn.attacker.example": [["93.184.216.34", "10.1.2.3"]]})
    url = "https://cdn.attacker.example/mug.png"
    for _ in range(2):
        with pytest.raises(UnsafeURL) as caught:
            check_url(url, STRICT)
        assert caught.value.reason == "not_public" and "private" in caught.value.message
    check_url(url, AddressPolicy.from_entries([ip_network("10.0.0.0/8")]))  # another policy, same answer
    with pytest.raises(UnsafeURL):
        check_url(url, STRICT)
    assert asked == ["cdn.attacker.example"]


def test_a_remembered_unresolvable_local_name_is_still_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = _resolve_as(monkeypatch, {"printer.local": [[]]})
    for _ in range(2):
        with pytest.raises(UnsafeURL):
            check_url("http://printer.local/x.png", STRICT)
    assert asked == ["printer.local"]


def test_remembered_answers_and_failures_expire(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    memory = ResolveCache(ttl_s=60.0, failure_ttl_s=15.0, clock=clock)
    asked = _resolve_as(monkeypatch, {"cdn.shop.example": [["93.184.216.34"]], "img.gone.example": [[]]})

    def check(host: str) -> None:
        check_url(f"https://{host}/a.png", STRICT, resolutions=memory)

    check("cdn.shop.example")
    check("img.gone.example")
    clock.now += 14.0
    check("cdn.shop.example")
    check("img.gone.example")
    assert asked == ["cdn.shop.example", "img.gone.example"]
    clock.now += 2.0  # 16 s: the failure is forgotten, the answer is not
    check("cdn.shop.example")
    check("img.gone.example")
    assert asked == ["cdn.shop.example", "img.gone.example", "img.gone.example"]
    clock.now += 45.0  # 61 s: the answer is forgotten too
    check("cdn.shop.example")
    assert asked[-1] == "cdn.shop.example" and len(asked) == 4


def test_the_memory_is_bounded_and_keeps_the_newest(monkeypatch: pytest.MonkeyPatch) -> None:
    memory = ResolveCache(max_entries=2, clock=FakeClock())
    asked = _resolve_as(monkeypatch, {f"h{i}.example": [["93.184.216.34"]] for i in range(3)})
    for i in range(3):
        check_url(f"https://h{i}.example/a.png", STRICT, resolutions=memory)
    check_url("https://h2.example/a.png", STRICT, resolutions=memory)
    check_url("https://h0.example/a.png", STRICT, resolutions=memory)  # the oldest, dropped for h2
    assert asked == ["h0.example", "h1.example", "h2.example", "h0.example"]


def test_the_transport_resolves_at_every_connect_whatever_the_submit_remembered(
    store: LocalObjectStore, public: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding against the memory: at submit the name is the allowed 127.0.0.1 (remembered);
    by the time genline connects it answers 127.0.0.2. The transport asks again and refuses."""
    port = public.base_url.rsplit(":", 1)[1]
    name = "cdn.flip.example"
    asked = _resolve_as(monkeypatch, {name: [["127.0.0.1"], ["127.0.0.1"], ["127.0.0.2"]]})
    link = f"http://{name}:{port}/a.png"
    check_url(link, LOOPBACK_ONLY)
    check_url(link, LOOPBACK_ONLY)
    assert asked == [name]  # the submits: one resolution, remembered
    with SafeClient(LOOPBACK_ONLY) as http:  # a connect: resolved again (second answer, allowed)
        info = copy_url_to_store(http, store, link, "k/a.png", expires_at=None, expect_type="image")
    assert info.size == len(PNG) and asked == [name, name]
    with SafeClient(LOOPBACK_ONLY) as http, pytest.raises(StorageError) as caught:  # a new connect: asked again
        copy_url_to_store(http, store, link, "k/b.png", expires_at=None, expect_type="image")
    assert caught.value.code == "result_link_blocked" and "loopback" in caught.value.message
    assert asked == [name, name, name]
    assert len(public.hits) == 1  # the refused connect reached nothing
