"""URL images, served by a local HTTP server on 127.0.0.1 that the test starts (allowed by
`allow_private_addresses`, which is off by default)."""

import contextlib
import http.server
import io
import threading
import time

import pytest
from helpers import download_policy, image_policy
from PIL import Image

from vlmflow import fetch as fetch_module
from vlmflow.fetch import UrlIndex, check_url, fetch, fetch_all
from vlmflow.image_refs import BlobStore, ImageRef
from vlmflow.image_validation import validate_refs


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
        path = self.path.split("?", 1)[0]
        if path == "/ok.png":
            self.send(200, PNG)
        elif path == "/octet":
            self.send(200, PNG, ctype="application/octet-stream")
        elif path == "/html":
            self.send(200, b"<html><body>login</body></html>", ctype="text/html; charset=utf-8")
        elif path == "/slow":
            time.sleep(1.0)
            self.send(200, PNG)
        elif path == "/big-declared":
            self.send(200, b"\0" * 5000)
        elif path == "/big-streamed":
            self.send(200, b"\x89PNG" + b"\0" * 5000, length=False)
        elif path == "/flaky":
            if HITS[self.path] == 1:
                self.send(503, b"busy", ctype="text/plain")
            else:
                self.send(200, PNG)
        elif path == "/to-file":
            self.send_response(302)
            self.send_header("Location", "file:///etc/passwd")
            self.end_headers()
        elif path == "/to-metadata":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
            self.end_headers()
        elif path == "/chunked-broken":  # a chunk announced, the connection dropped
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"400\r\n" + PNG[:10])
        elif path == "/truncated":  # Content-Length says more than comes
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG[:20])
        elif path == "/drip":  # one byte every 0.25 s, each read well within the timeout
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "400")
            self.end_headers()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                for _ in range(400):
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(0.25)
        elif path == "/broken.jpg":
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


FAST = download_policy(
    timeout=0.3, max_bytes=1000, retries=1, backoff=0.0, allow_private_addresses=True
)


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
        ("/to-file", "bad_redirect: redirect to a non-http(s) URL refused: file:///etc/passwd"),
        ("/chunked-broken", "download_error: broken response (IncompleteRead"),
        ("/truncated", "download_error: broken response (IncompleteRead"),
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
    policy = download_policy(timeout=2, max_bytes=100_000, retries=0, allow_private_addresses=True)
    recs = validate_refs(
        refs, image_policy(), cache_dir=tmp_path, download=policy, threads=2, progress=False
    )
    assert [r["ok"] for r in recs] == [True, False, False]
    assert (recs[0]["width"], recs[0]["height"]) == (10, 8) and recs[0]["kind"] == "url"
    assert recs[1]["reason"].startswith("decode_error")
    assert recs[2]["reason"].startswith("bad_content_type")


def test_redirects_to_other_schemes_are_refused_without_retrying(server, tmp_path):
    HITS.pop("/to-file", None)
    got = fetch(server + "/to-file", BlobStore(tmp_path), FAST)
    assert got.error.startswith("bad_redirect") and "attempts" not in got.error
    assert HITS["/to-file"] == 1


def test_a_broken_response_quarantines_its_row_and_keeps_the_index(server, tmp_path):
    """IncompleteRead from one server (a chunked response cut off) is that URL's reason; the
    other downloads finish and the index remembers them."""
    blobs = BlobStore(tmp_path)
    urls = [server + "/ok.png", server + "/chunked-broken", server + "/octet"]
    got = fetch_all(urls, blobs, FAST, threads=1, progress=False)
    assert got[urls[1]].error.startswith("download_error: broken response (IncompleteRead")
    assert "after 2 attempts" in got[urls[1]].error
    assert got[urls[0]].error == "" and got[urls[2]].error == ""
    index = UrlIndex(blobs)
    assert len(index.entries) == 2 and index.get(urls[0]) and index.get(urls[2])


def test_the_index_is_saved_when_the_downloads_are_interrupted(server, tmp_path, monkeypatch):
    blobs = BlobStore(tmp_path)
    real = fetch_module.fetch

    def stop_at_second(url, blobs_, policy):
        if url.endswith("/octet"):
            raise KeyboardInterrupt
        return real(url, blobs_, policy)

    monkeypatch.setattr(fetch_module, "fetch", stop_at_second)
    with pytest.raises(KeyboardInterrupt):
        fetch_all([server + "/ok.png", server + "/octet"], blobs, FAST, threads=1, progress=False)
    index = UrlIndex(blobs)
    assert len(index.entries) == 1 and index.get(server + "/ok.png")


def test_a_dripping_server_is_cut_off_at_the_deadline(server, tmp_path):
    """Each byte comes well within the 1 s timeout; the 1.5 s deadline per URL (all attempts
    included) stops the download anyway."""
    policy = download_policy(
        timeout=1.0, max_bytes=1000, retries=3, backoff=0.1, deadline=1.5,
        allow_private_addresses=True,
    )  # fmt: skip
    start = time.monotonic()
    got = fetch(server + "/drip", BlobStore(tmp_path), policy)
    took = time.monotonic() - start
    assert got.error.startswith("download_timeout: deadline of 1.5 s"), got.error
    assert took < 4, took  # not the 100 s the drip would take


@pytest.mark.parametrize(
    "url, kind",
    [
        ("http://127.0.0.1:8080/a.png", "loopback"),
        ("http://localhost/a.png", "loopback"),
        ("http://[::1]/a.png", "loopback"),
        ("http://[::ffff:127.0.0.1]/a.png", "loopback"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://10.1.2.3/a.png", "private"),
        ("http://192.168.0.10/a.png", "private"),
        ("http://0.0.0.0/a.png", "unspecified"),
    ],
)
def test_private_addresses_are_refused_by_default(url, kind):
    assert check_url(url).startswith("private_address:") and f"({kind})" in check_url(url)
    assert check_url(url, allow_private=True) == ""


def test_public_addresses_pass_the_address_check():
    assert check_url("http://93.184.215.14/a.png") == ""
    assert check_url("https://[2606:4700::1111]/a.png") == ""


def test_private_hosts_are_not_contacted_unless_allowed(server, tmp_path):
    HITS.pop("/ok.png", None)
    strict = download_policy(timeout=1, max_bytes=1000, retries=0)
    got = fetch(server + "/ok.png", BlobStore(tmp_path), strict)
    assert got.error.startswith("private_address: host '127.0.0.1' resolves to 127.0.0.1")
    assert "/ok.png" not in HITS  # refused before any request
    assert fetch(server + "/ok.png", BlobStore(tmp_path), FAST).error == ""


def test_redirects_to_private_addresses_are_refused(server, tmp_path, monkeypatch):
    """The test server stands for a public host; its redirect to the cloud metadata address
    is refused at once."""
    real = fetch_module._address_reason
    monkeypatch.setattr(
        fetch_module, "_address_reason", lambda h: "" if h == "127.0.0.1" else real(h)
    )
    strict = download_policy(timeout=1, max_bytes=1000, retries=2)
    HITS.pop("/to-metadata", None)
    got = fetch(server + "/to-metadata", BlobStore(tmp_path), strict)
    assert got.error.startswith("bad_redirect: http://169.254.169.254/latest/meta-data/: private")
    assert HITS["/to-metadata"] == 1


def test_the_url_index_holds_no_credentials(server, tmp_path):
    blobs = BlobStore(tmp_path)
    host = server.removeprefix("http://")
    url = f"http://me:pw-9931@{host}/ok.png?token=tk-5521"
    assert fetch_all([url], blobs, FAST, progress=False)[url].error == ""
    text = UrlIndex(blobs).path.read_text()
    assert "pw-9931" not in text and "tk-5521" not in text
    assert UrlIndex(blobs).get(url) is not None  # found again by the full URL
