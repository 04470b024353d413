"""Image URLs (http/https only), downloaded once into the content-addressed blob store.

Each URL is fetched with a timeout per attempt, a size cap (checked on Content-Length and while
reading), a content-type check (image/* or application/octet-stream; HTML error pages are
refused), and retries with exponential back-off on timeouts, connection errors, 429 and 5xx.
Redirects are followed to http/https targets only. A URL fetched before (index file next to the
blobs) is not fetched again; failures are not remembered, so a re-run tries them again.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .images import BlobStore

log = logging.getLogger(__name__)

USER_AGENT = "vlmflow-data/1 (+https://github.com/vlmflow)"
_OK_TYPES = ("image/", "application/octet-stream", "binary/octet-stream")


@dataclass(frozen=True)
class DownloadPolicy:
    timeout: float = 30.0
    """Seconds per attempt (connect and each read)."""
    max_bytes: int = 50_000_000
    retries: int = 3
    """Extra attempts after a failed one (timeouts, connection errors, HTTP 429 and 5xx)."""
    backoff: float = 1.0
    """Seconds before the first retry; doubled for each further one."""

    @classmethod
    def from_config(cls, cfg: dict) -> DownloadPolicy:
        return cls(
            timeout=cfg["timeout"],
            max_bytes=cfg["max_bytes"],
            retries=cfg["retries"],
            backoff=cfg["backoff"],
        )


@dataclass
class Fetched:
    url: str
    path: Path | None = None
    sha256: str = ""
    error: str = ""


class _Retryable(Exception):
    pass


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise urllib.error.URLError(f"redirect to a non-http(s) URL refused: {newurl}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_HttpOnlyRedirects)


def check_url(url: str) -> str:
    """'' when `url` may be fetched, else the reason it may not."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        return f"bad_url: scheme '{parts.scheme}' is not allowed (http and https only)"
    if not parts.hostname:
        return "bad_url: no host"
    return ""


def _attempt(url: str, policy: DownloadPolicy) -> bytes:
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with _OPENER.open(req, timeout=policy.timeout) as resp:
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
                chunk = resp.read(1 << 16)
                if not chunk:
                    break
                total += len(chunk)
                if total > policy.max_bytes:
                    raise ValueError(f"too_large: more than max_bytes {policy.max_bytes} bytes")
                chunks.append(chunk)
            return b"".join(chunks)
    except urllib.error.HTTPError as e:
        if e.code == 429 or e.code >= 500:
            raise _Retryable(f"download_error: HTTP {e.code} {e.reason}") from None
        raise ValueError(f"download_error: HTTP {e.code} {e.reason}") from None
    except TimeoutError:
        raise _Retryable(f"download_timeout: no answer within {policy.timeout:g} s") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, TimeoutError):
            raise _Retryable(f"download_timeout: no answer within {policy.timeout:g} s") from None
        raise _Retryable(f"download_error: {e.reason}") from None
    except (ConnectionError, OSError) as e:
        raise _Retryable(f"download_error: {type(e).__name__}: {e}") from None


def fetch(url: str, blobs: BlobStore, policy: DownloadPolicy) -> Fetched:
    """Download one URL into the blob store. Never raises for a bad URL or server: the reason
    comes back in `error` ('kind: details')."""
    bad = check_url(url)
    if bad:
        return Fetched(url, error=bad)
    delay = policy.backoff
    for attempt in range(policy.retries + 1):
        try:
            data = _attempt(url, policy)
        except ValueError as e:
            return Fetched(url, error=str(e))
        except _Retryable as e:
            if attempt == policy.retries:
                tries = policy.retries + 1
                return Fetched(url, error=f"{e} (after {tries} attempt{'s' * (tries > 1)})")
            log.debug("retrying %s after %s", url, e)
            time.sleep(delay)
            delay *= 2
            continue
        sha, path = blobs.put(data)
        return Fetched(url, path=path, sha256=sha)
    raise AssertionError("unreachable")


class UrlIndex:
    """url → blob file of earlier successful downloads (a JSON-lines file beside the blobs)."""

    def __init__(self, blobs: BlobStore):
        self.path = blobs.dir.parent / "url_index.jsonl"
        self.entries: dict[str, dict] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                    self.entries[rec["url"]] = rec
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue

    def get(self, url: str) -> Fetched | None:
        rec = self.entries.get(url)
        if rec and os.path.isfile(rec["path"]):
            return Fetched(url, path=Path(rec["path"]), sha256=rec["sha256"])
        return None

    def save(self, fetched: list[Fetched]) -> None:
        from .io import atomic_file

        for f in fetched:
            if not f.error:
                self.entries[f.url] = {"url": f.url, "sha256": f.sha256, "path": str(f.path)}
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
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = pool.map(lambda u: fetch(u, blobs, policy), todo)
            for f in tqdm(results, total=len(todo), desc="download", disable=not progress):
                out[f.url] = f
        index.save([out[u] for u in todo])
        failed = sum(1 for u in todo if out[u].error)
        log.info("downloaded %d URLs (%d failed)", len(todo) - failed, failed)
    return out
