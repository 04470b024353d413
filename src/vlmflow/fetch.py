"""Image URLs (http/https only), downloaded once into the content-addressed blob store.

Each URL is fetched with a timeout per attempt, a total deadline per URL (attempts and back-off
included: a server dripping a byte at a time cannot hold a download forever), a size cap (checked
on Content-Length and while reading), a content-type check (image/* or application/octet-stream;
HTML error pages are refused), and retries with exponential back-off on timeouts, connection
errors, broken responses (IncompleteRead), 429 and 5xx. Redirects are followed to http/https
targets only (any other scheme is refused at once, without retrying). Hosts that resolve to
loopback, private, link-local or other non-global addresses are refused (the URL itself and every
redirect target) unless `allow_private_addresses` is set: a third-party dataset cannot make the
login node call internal hosts. A URL fetched before (index file next to the blobs) is not
fetched again; failures are not remembered, so a re-run tries them again. One URL's failure,
whatever it is, is that row's reason: it never stops the other downloads, and the index of the
finished ones is saved even when the job is interrupted.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import ipaddress
import json
import logging
import os
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

from .image_refs import BlobStore
from .io import atomic_file
from .redact import redact_url

log = logging.getLogger(__name__)

USER_AGENT = "vlmflow-data/1 (+https://github.com/vlmflow)"
_OK_TYPES = ("image/", "application/octet-stream", "binary/octet-stream")


@dataclass(frozen=True)
class DownloadPolicy:
    """How image URLs are fetched (`datasets.<name>.images.download`; the defaults are the
    schema's, `from_config` builds it from a resolved section)."""

    timeout: float
    """Seconds per attempt (connect and each read)."""
    max_bytes: int
    retries: int
    """Extra attempts after a failed one (timeouts, connection errors, HTTP 429 and 5xx)."""
    backoff: float
    """Seconds before the first retry; doubled for each further one."""
    deadline: float
    """Seconds per URL in all (every attempt, read and back-off)."""
    allow_private_addresses: bool
    """Allow hosts that resolve to loopback, private, link-local or other non-global addresses."""

    @classmethod
    def from_config(cls, cfg: dict) -> DownloadPolicy:
        return cls(
            timeout=cfg["timeout"],
            max_bytes=cfg["max_bytes"],
            retries=cfg["retries"],
            backoff=cfg["backoff"],
            deadline=cfg["deadline"],
            allow_private_addresses=cfg["allow_private_addresses"],
        )


@dataclass
class Fetched:
    url: str
    path: Path | None = None
    sha256: str = ""
    error: str = ""


class _Retryable(Exception):
    pass


class _Refused(ValueError):
    """A final verdict raised from inside urllib (a redirect target): not retried."""


class _Deadline(ValueError):
    pass


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects to http(s) URLs whose host `check_url` accepts; refuses the others."""

    def __init__(self, allow_private: bool):
        super().__init__()
        self.allow_private = allow_private

    def http_error_302(self, req, fp, code, msg, headers):
        target = headers.get("location") or headers.get("uri")
        if target:
            self._check(urljoin(req.full_url, target))
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self._check(newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)

    def _check(self, newurl: str) -> None:
        if urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise _Refused(
                f"bad_redirect: redirect to a non-http(s) URL refused: {redact_url(newurl)}"
            )
        bad = check_url(newurl, self.allow_private)
        if bad:
            raise _Refused(f"bad_redirect: {redact_url(newurl)}: {bad}")


def _address_reason(host: str) -> str:
    """'' when every address `host` resolves to is a global one, else why it is refused. A host
    that does not resolve here is left to the download (a proxy may resolve it)."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return ""
    for info in infos:
        ip = ipaddress.ip_address(info[4][0].split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        if not ip.is_global or ip.is_multicast:
            kind = next(
                (
                    k
                    for k in ("loopback", "unspecified", "link_local", "multicast", "private")
                    if getattr(ip, f"is_{k}")
                ),
                "non-global",
            ).replace("_", "-")
            return (
                f"private_address: host '{host}' resolves to {ip} ({kind}); set "
                "images.download.allow_private_addresses: true to allow such hosts"
            )
    return ""


def check_url(url: str, allow_private: bool = False) -> str:
    """'' when `url` may be fetched, else the reason it may not."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        return f"bad_url: scheme '{parts.scheme}' is not allowed (http and https only)"
    if not parts.hostname:
        return "bad_url: no host"
    if not allow_private:
        return _address_reason(parts.hostname)
    return ""


def _deadline_error(policy: DownloadPolicy) -> _Deadline:
    return _Deadline(f"download_timeout: deadline of {policy.deadline:g} s for this URL passed")


def _request(url: str) -> urllib.request.Request:
    """The request for `url`; `user:password@` in it becomes HTTP basic authentication, sent to
    that host only (not to redirect targets)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    netloc = parts.netloc.rpartition("@")[2]
    req = urllib.request.Request(parts._replace(netloc=netloc).geturl())
    req.add_header("User-Agent", USER_AGENT)
    user, password = unquote(parts.username or ""), unquote(parts.password or "")
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    req.add_unredirected_header("Authorization", f"Basic {token}")
    return req


def _attempt(url: str, policy: DownloadPolicy, deadline_at: float | None = None) -> bytes:
    """One download. Every socket wait is bounded by `policy.timeout` and by what is left until
    `deadline_at` (time.monotonic)."""
    if deadline_at is None:
        deadline_at = time.monotonic() + policy.deadline

    def wait() -> float:
        left = deadline_at - time.monotonic()
        if left <= 0:
            raise _deadline_error(policy)
        return min(policy.timeout, left)

    req = _request(url)
    opener = urllib.request.build_opener(_CheckedRedirects(policy.allow_private_addresses))
    try:
        with opener.open(req, timeout=wait()) as resp:
            sock = getattr(getattr(resp.fp, "raw", None), "_sock", None)
            ctype = (resp.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if ctype and not ctype.startswith(_OK_TYPES):
                raise ValueError(f"bad_content_type: server sent '{ctype}', not an image")
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > policy.max_bytes:
                raise ValueError(
                    f"too_large: Content-Length {int(length)} > max_bytes {policy.max_bytes}"
                )
            chunks, total = [], 0
            while True:
                if sock is not None:
                    sock.settimeout(wait())
                elif time.monotonic() > deadline_at:
                    raise _deadline_error(policy)
                chunk = resp.read1(1 << 16)
                if not chunk:
                    break
                total += len(chunk)
                if total > policy.max_bytes:
                    raise ValueError(f"too_large: more than max_bytes {policy.max_bytes} bytes")
                chunks.append(chunk)
            if length and length.isdigit() and total < int(length):
                raise http.client.IncompleteRead(b"", int(length) - total)
            return b"".join(chunks)
    except urllib.error.HTTPError as e:
        if e.code == 429 or e.code >= 500:
            raise _Retryable(f"download_error: HTTP {e.code} {e.reason}") from None
        raise ValueError(f"download_error: HTTP {e.code} {e.reason}") from None
    except TimeoutError:
        if time.monotonic() >= deadline_at:
            raise _deadline_error(policy) from None
        raise _Retryable(f"download_timeout: no answer within {policy.timeout:g} s") from None
    except http.client.HTTPException as e:  # IncompleteRead, BadStatusLine, ...
        raise _Retryable(f"download_error: broken response ({type(e).__name__}: {e})") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, TimeoutError):
            raise _Retryable(f"download_timeout: no answer within {policy.timeout:g} s") from None
        raise _Retryable(f"download_error: {e.reason}") from None
    except (ConnectionError, OSError) as e:
        raise _Retryable(f"download_error: {type(e).__name__}: {e}") from None


def fetch(url: str, blobs: BlobStore, policy: DownloadPolicy) -> Fetched:
    """Download one URL into the blob store. Never raises for a bad URL or server: the reason
    comes back in `error` ('kind: details')."""
    bad = check_url(url, policy.allow_private_addresses)
    if bad:
        return Fetched(url, error=bad)
    deadline_at = time.monotonic() + policy.deadline
    delay = policy.backoff
    for attempt in range(policy.retries + 1):
        try:
            data = _attempt(url, policy, deadline_at)
        except ValueError as e:
            return Fetched(url, error=str(e))
        except _Retryable as e:
            tries = attempt + 1
            if attempt == policy.retries or time.monotonic() + delay >= deadline_at:
                after = f" (after {tries} attempt{'s' * (tries > 1)})"
                if attempt < policy.retries:
                    after = f" (after {tries} attempt{'s' * (tries > 1)}; deadline "
                    after += f"of {policy.deadline:g} s for this URL reached)"
                return Fetched(url, error=f"{e}{after}")
            log.debug("retrying %s after %s", url, e)
            time.sleep(delay)
            delay *= 2
            continue
        sha, path = blobs.put(data)
        return Fetched(url, path=path, sha256=sha)
    raise AssertionError("unreachable")


def _fetch_guarded(url: str, blobs: BlobStore, policy: DownloadPolicy) -> Fetched:
    """`fetch`, with any unforeseen error of one URL turned into that URL's reason."""
    try:
        return fetch(url, blobs, policy)
    except Exception as e:
        return Fetched(url, error=f"download_error: {type(e).__name__}: {e}")


class UrlIndex:
    """url → blob file of earlier successful downloads (a JSON-lines file beside the blobs).
    Entries are keyed by the sha256 of the URL and show it without credentials
    (`vlmflow.redact`): the cache holds no token."""

    def __init__(self, blobs: BlobStore):
        self.path = blobs.dir.parent / "url_index.jsonl"
        self.entries: dict[str, dict] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                    key = rec.get("key") or self.key(rec["url"])  # files of older versions
                    self.entries[key] = {**rec, "key": key, "url": redact_url(rec["url"])}
                except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                    continue

    @staticmethod
    def key(url: str) -> str:
        return hashlib.sha256(url.encode("utf-8", "surrogateescape")).hexdigest()

    def get(self, url: str) -> Fetched | None:
        rec = self.entries.get(self.key(url))
        if rec and os.path.isfile(rec["path"]):
            return Fetched(url, path=Path(rec["path"]), sha256=rec["sha256"])
        return None

    def save(self, fetched: list[Fetched]) -> None:
        for f in fetched:
            if not f.error:
                key = self.key(f.url)
                self.entries[key] = {
                    "key": key,
                    "url": redact_url(f.url),
                    "sha256": f.sha256,
                    "path": str(f.path),
                }
        with atomic_file(self.path) as tmp:
            tmp.write_text(
                "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in self.entries.values()),
                encoding="utf-8",
            )


def fetch_all(
    urls: list[str],
    blobs: BlobStore,
    policy: DownloadPolicy,
    threads: int = 1,
    progress: bool = True,
) -> dict[str, Fetched]:
    """Fetch each distinct URL once (URLs in the index are not fetched again). Downloads run on
    up to 4 x `threads` threads (they wait on the network, not the CPU)."""
    from tqdm import tqdm

    index = UrlIndex(blobs)
    out: dict[str, Fetched] = {}
    todo = []
    for url in dict.fromkeys(urls):
        known = index.get(url)
        if known:
            out[url] = known
        else:
            todo.append(url)
    if todo:
        workers = max(1, min(32, 4 * threads, len(todo)))
        pool = ThreadPoolExecutor(max_workers=workers)
        try:
            results = pool.map(lambda u: _fetch_guarded(u, blobs, policy), todo)
            for f in tqdm(results, total=len(todo), desc="download", disable=not progress):
                out[f.url] = f
        finally:  # stopped: no new download starts, and the finished ones are remembered
            pool.shutdown(wait=True, cancel_futures=True)
            index.save([out[u] for u in todo if u in out])
        failed = sum(1 for u in todo if out[u].error)
        log.info("downloaded %d URLs (%d failed)", len(todo) - failed, failed)
    return out
