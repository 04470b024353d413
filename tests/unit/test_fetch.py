"""URL images, served by a local HTTP server on 127.0.0.1 that the test starts."""

import contextlib
import http.server
import io
import threading
import time

import pytest
from PIL import Image

from vlmflow.fetch import DownloadPolicy, fetch, fetch_all
from vlmflow.images import BlobStore, ImagePolicy, ImageRef, validate_refs


def png_bytes(size=(10, 8), colour=(0, 128, 255)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


PNG = png_bytes()
_buf = io.BytesIO()
Image.effect_noise((64, 64), 50).convert("RGB").save(_buf, "JPEG")
JPEG = _buf.getvalue()
HITS: dict[str, int] = {}


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def send(self, code, body=b"", ctype="image/png", length=True):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError):  # the client gave up (timeout test)
            self.wfile.write(body)

    def do_GET(self):
        HITS[self.path] = HITS.get(self.path, 0) + 1
        if self.path == "/ok.png":
            self.send(200, PNG)
        elif self.path == "/octet":
            self.send(200, PNG, ctype="application/octet-stream")
        elif self.path == "/html":
            self.send(200, b"<html><body>login</body></html>", ctype="text/html; charset=utf-8")
        elif self.path == "/slow":
            time.sleep(1.0)
            self.send(200, PNG)
        elif self.path == "/big-declared":
            self.send(200, b"\0" * 5000)
        elif self.path == "/big-streamed":
            self.send(200, b"\x89PNG" + b"\0" * 5000, length=False)
        elif self.path == "/flaky":
            if HITS[self.path] == 1:
                self.send(503, b"busy", ctype="text/plain")
            else:
                self.send(200, PNG)
        elif self.path == "/to-file":
            self.send_response(302)
            self.send_header("Location", "file:///etc/passwd")
            self.end_headers()
        elif self.path == "/broken.jpg":
            self.send(200, JPEG[: len(JPEG) // 2], ctype="image/jpeg")
        else:
            self.send(404, b"not found", ctype="text/plain")


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


FAST = DownloadPolicy(timeout=0.3, max_bytes=1000, retries=1, backoff=0.0)


@pytest.mark.parametrize(
    "path, reason",
    [
        ("/ok.png", ""),
        ("/octet", ""),
        ("/missing.png", "download_error: HTTP 404"),
        ("/slow", "download_timeout"),
        ("/big-declared", "too_large: Content-Length 5000"),
        ("/big-streamed", "too_large: more than max_bytes 1000"),
        ("/html", "bad_content_type: server sent 'text/html'"),
        ("/to-file", "download_error"),
    ],
)
def test_fetch_reasons(server, tmp_path, path, reason):
    got = fetch(server + path, BlobStore(tmp_path), FAST)
    if reason:
        assert got.error.startswith(reason), got.error
        assert got.path is None
    else:
        assert got.error == "" and got.path.read_bytes() == PNG
        assert got.path.name.startswith(got.sha256)


def test_timeouts_are_retried_then_reported(server, tmp_path):
    HITS.pop("/slow", None)
    got = fetch(server + "/slow", BlobStore(tmp_path), FAST)
    assert "after 2 attempts" in got.error and HITS["/slow"] == 2


def test_server_errors_are_retried(server, tmp_path):
    HITS.pop("/flaky", None)
    got = fetch(server + "/flaky", BlobStore(tmp_path), FAST)
    assert got.error == "" and HITS["/flaky"] == 2
    HITS.pop("/missing.png", None)
    fetch(server + "/missing.png", BlobStore(tmp_path), FAST)
    assert HITS["/missing.png"] == 1  # 404 is final


def test_only_http_and_https(tmp_path):
    for url in ("ftp://example.org/a.png", "file:///etc/passwd"):
        assert fetch(url, BlobStore(tmp_path), FAST).error.startswith("bad_url: scheme")


def test_each_url_is_downloaded_once(server, tmp_path):
    blobs = BlobStore(tmp_path)
    HITS.pop("/ok.png", None)
    HITS.pop("/missing.png", None)
    urls = [server + "/ok.png", server + "/ok.png", server + "/missing.png"]
    first = fetch_all(urls, blobs, FAST, progress=False)
    again = fetch_all(urls, blobs, FAST, progress=False)
    assert HITS["/ok.png"] == 1  # the index remembers the download
    assert HITS["/missing.png"] == 2  # failures are tried again on the next run
    assert first[urls[0]].path == again[urls[0]].path


def test_url_images_are_validated_like_files(server, tmp_path):
    refs = [ImageRef("url", "", server + p) for p in ("/ok.png", "/broken.jpg", "/html")]
    policy = DownloadPolicy(timeout=2, max_bytes=100_000, retries=0)
    recs = validate_refs(
        refs, ImagePolicy(), cache_dir=tmp_path, download=policy, threads=2, progress=False
    )
    assert [r["ok"] for r in recs] == [True, False, False]
    assert (recs[0]["width"], recs[0]["height"]) == (10, 8) and recs[0]["kind"] == "url"
    assert recs[1]["reason"].startswith("decode_error")
    assert recs[2]["reason"].startswith("bad_content_type")
