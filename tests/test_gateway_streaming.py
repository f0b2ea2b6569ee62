"""Streaming over HTTP, on a real cluster and a real gateway: a generator ``__call__``
answered with chunked transfer encoding (a chunk per yield, each sent as it is yielded) or
server-sent events, an error before and after the first chunk, a client leaving mid-stream
stops the generator, and a replica killed mid-stream ends the answer."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
import uuid
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import redis

import taskserve
from taskserve.http import Response
from taskserve.store.keys import stream_key

from .helpers import Cluster, replica_pids, running_gateway, wait_until


class Streamer:
    """``__call__`` is a generator; ``?kind=`` picks what it yields."""

    def __init__(self, address: str) -> None:
        self.client = redis.Redis.from_url(address)

    def __call__(self, request):
        query = request.query_params
        kind = query.get("kind", "tokens")
        if kind == "tokens":
            for i in range(int(query.get("n", "3"))):
                if i == 1 and query.get("gate"):       # the second waits until the client saw the first
                    deadline = time.monotonic() + 30
                    while not self.client.exists(query["gate"]) and time.monotonic() < deadline:
                        time.sleep(0.01)
                yield f"t{i}"
        elif kind == "say":
            yield query["say"]
        elif kind == "raw":
            yield b"\x00\xff"
            yield "text"
        elif kind == "json":
            yield {"i": 0}
            yield [1, 2]
            yield "three"
        elif kind == "fails":
            yield "t0"
            yield "t1"
            raise ValueError("broke after 2")
        elif kind == "fails_at_once":
            raise ValueError("broke at once")
        elif kind == "forever":
            try:
                i = 0
                while True:
                    yield f"{i}\n"
                    i += 1
                    time.sleep(0.005)
            finally:
                self.client.set(query["marker"], "closed", ex=300)     # GeneratorExit: the client left


class AsyncStreamer:
    """An async generator ``__call__`` that waits between tokens (cancelled, not polled)."""

    def __init__(self, address: str) -> None:
        self.client = redis.Redis.from_url(address)

    async def __call__(self, request):
        try:
            yield "first"
            await asyncio.sleep(3600)
            yield "never"
        finally:
            self.client.set(request.query_params["marker"], "cancelled", ex=300)


@pytest.fixture(scope="module")
def http(cluster: Cluster) -> Iterator[httpx.Client]:
    with running_gateway(cluster) as client:
        yield client


def deployed(http: httpx.Client, cls: type, name: str, address: str, **options) -> object:
    model = taskserve.deployment(cls).options(name=name, num_cpus=0.1, max_ongoing_requests=4, **options)
    model.deploy(address)
    wait_until(lambda: http.get("/-/routes").json().get(f"/{name}") == name, timeout=30, message="the route")
    return model


@pytest.fixture
def streamer(connected, unique_name, http):
    model = deployed(http, Streamer, unique_name, connected.url, request_timeout_s=120)
    yield model
    model.delete()


def open_raw(http: httpx.Client, path: str, headers: str = "") -> socket.socket:
    """A GET of ``path`` on a socket of its own (the caller closes it)."""
    sock = socket.create_connection((http.base_url.host, http.base_url.port), timeout=30)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}\r\n".encode())
    return sock


def read_until(sock: socket.socket, data: bytes, marker: bytes) -> bytes:
    while marker not in data:
        more = sock.recv(65536)
        assert more, f"the connection closed before {marker!r}: {data!r}"
        data += more
    return data


def test_a_generator_is_answered_chunk_by_chunk_as_it_yields(connected, streamer, http):
    gate = f"stream-gate:{uuid.uuid4().hex}"
    with open_raw(http, f"/{streamer.name}?kind=tokens&n=3&gate={gate}") as sock:
        head, _, body = read_until(sock, b"", b"\r\n\r\n").partition(b"\r\n\r\n")
        lines = head.decode().lower().split("\r\n")
        assert lines[0] == "http/1.1 200 ok" and "transfer-encoding: chunked" in lines, lines
        assert "content-type: text/plain; charset=utf-8" in lines
        assert any(line.startswith("x-taskserve-version: ") for line in lines), lines
        body = read_until(sock, body, b"2\r\nt0\r\n")        # before the generator yields the second
        assert body == b"2\r\nt0\r\n"
        redis.Redis.from_url(connected.url).set(gate, "1", ex=60)
        body = read_until(sock, body, b"0\r\n\r\n")
    assert body == b"2\r\nt0\r\n2\r\nt1\r\n2\r\nt2\r\n0\r\n\r\n"       # a chunk per yield, then the end


def test_the_content_type_follows_the_first_chunk(streamer, http):
    raw = http.get(f"/{streamer.name}?kind=raw")
    assert raw.status_code == 200 and raw.headers["content-type"] == "application/octet-stream"
    assert raw.content == b"\x00\xfftext"                # bytes as they are, str as UTF-8
    values = http.get(f"/{streamer.name}?kind=json")
    assert values.headers["content-type"] == "application/x-ndjson"
    assert values.text == '{"i":0}\n[1,2]\nthree'        # JSON values one a line


def test_server_sent_events_with_accept_event_stream(streamer, http):
    answer = http.get(f"/{streamer.name}?kind=json", headers={"accept": "text/event-stream"})
    assert answer.status_code == 200 and answer.headers["content-type"] == "text/event-stream"
    assert answer.headers["cache-control"] == "no-cache"
    assert answer.text == 'data: {"i":0}\n\ndata: [1,2]\n\ndata: "three"\n\nevent: end\ndata: null\n\n'
    raw = http.get(f"/{streamer.name}?kind=raw", headers={"accept": "text/event-stream"})
    assert raw.text == 'event: bytes\ndata: "AP8="\n\ndata: "text"\n\nevent: end\ndata: null\n\n'


def test_an_error_after_chunks_ends_the_answer(streamer, http):
    events = http.get(f"/{streamer.name}?kind=fails", headers={"accept": "text/event-stream"})
    assert events.status_code == 200
    assert events.text == ('data: "t0"\n\ndata: "t1"\n\n'
                           'event: error\ndata: {"error":"ValueError","message":"broke after 2"}\n\n')
    received = b""
    with pytest.raises(httpx.RemoteProtocolError):         # cut off: no last chunk, so not taken for whole
        with http.stream("GET", f"/{streamer.name}?kind=fails") as answer:
            assert answer.status_code == 200
            for piece in answer.iter_raw():
                received += piece
    assert received == b"t0t1"


def test_an_error_before_the_first_chunk_is_an_ordinary_500(streamer, http):
    answer = http.get(f"/{streamer.name}?kind=fails_at_once", headers={"accept": "text/event-stream"})
    assert answer.status_code == 500 and answer.headers["content-type"] == "application/json"
    assert answer.json() == {"error": "ValueError", "message": "broke at once"}


@pytest.mark.parametrize("cls, closed", [(Streamer, "closed"), (AsyncStreamer, "cancelled")])
def test_a_client_leaving_mid_stream_stops_the_generator(connected, unique_name, http, cls, closed):
    model = deployed(http, cls, unique_name, connected.url, request_timeout_s=120)
    marker = f"stream-marker:{uuid.uuid4().hex}"
    client = redis.Redis.from_url(connected.url)
    with open_raw(http, f"/{unique_name}?kind=forever&marker={marker}") as sock:
        read_until(sock, b"", b"\r\n\r\n")        # the answer has begun: the client leaves now
    wait_until(lambda: client.get(marker) == closed.encode(), timeout=10,
               message="the generator to be stopped after its client left")
    model.delete()


def test_a_replica_killed_mid_stream_ends_the_answer(connected, streamer, http):
    [pid] = replica_pids(streamer.name)
    marker = f"stream-marker:{uuid.uuid4().hex}"
    received = ""
    with http.stream("GET", f"/{streamer.name}?kind=forever&marker={marker}",
                     headers={"accept": "text/event-stream"}, timeout=60) as answer:
        lines = answer.iter_lines()
        assert next(lines) == 'data: "0\\n"'
        os.kill(pid, signal.SIGKILL)
        for line in lines:        # ends, never hangs: the agent writes the stream's end
            received += line + "\n"
    assert received.endswith('event: error\ndata: {"error":"ReplicaError","message":"stream interrupted: the '
                             'replica serving it stopped; it is not run again"}\n\n'), received[-300:]
    wait_until(lambda: replica_pids(streamer.name), timeout=60, message="a replica again")


def test_stream_keys_expire_and_one_read_to_its_end_is_deleted(connected, streamer, http):
    client = redis.Redis.from_url(connected.url)

    def streams_holding(text: str) -> list:
        return [key for key in client.scan_iter(stream_key("*")) if text in repr(client.xrange(key))]

    http.get(f"/{streamer.name}?kind=fails", headers={"accept": "text/event-stream"})   # an error at its end
    keys = list(client.scan_iter(stream_key("*")))
    assert keys and all(client.ttl(key) > 0 or not client.exists(key) for key in keys), \
        {key: client.ttl(key) for key in keys}                # none is kept for ever
    # Read to its end, a stream's key goes at once (the gateway deletes it).
    said = uuid.uuid4().hex
    assert http.get(f"/{streamer.name}?kind=say&say={said}").text == said
    wait_until(lambda: not streams_holding(said), timeout=10, message="the stream read to its end to be deleted")


EVENT_PAGE = """<!doctype html>
<pre id="out"></pre>
<script>
  const source = new EventSource(decodeURIComponent(location.search.slice(1)));
  source.onmessage = (e) => { document.getElementById("out").textContent += JSON.parse(e.data); };
  source.addEventListener("end", () => { source.close(); document.body.dataset.state = "end"; });
  source.addEventListener("error", (e) => {
    document.body.dataset.state = e.data ? "error: " + JSON.parse(e.data).message : "connection lost";
    source.close();
  });
</script>"""


class EventPage:
    def __init__(self, address: str) -> None:
        pass

    def __call__(self, request):
        return Response(EVENT_PAGE, media_type="text/html")


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium for the browser test; apt-get install chromium")
def test_a_browsers_event_source_reads_the_events(connected, streamer, http):
    from playwright.sync_api import expect, sync_playwright

    from .test_dashboard import CHROMIUM_ARGS

    page_model = deployed(http, EventPage, f"{streamer.name}-page", connected.url)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            for query, text, state in [("kind=tokens&n=3", "t0t1t2", "end"),
                                       ("kind=fails", "t0t1", "error: broke after 2")]:
                stream_url = f"/{streamer.name}?{query}"
                page.goto(f"{http.base_url}/{page_model.name}?{stream_url.replace('&', '%26')}")
                expect(page.locator("body")).to_have_attribute("data-state", state, timeout=15_000)
                expect(page.locator("#out")).to_have_text(text)
        finally:
            browser.close()
    page_model.delete()
