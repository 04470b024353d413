"""Secrets never reach logs, Parquet files or archives: one place that strips them.

- URLs: the userinfo (`https://user:TOKEN@host/` → `https://host/`) and the values of token-like
  query parameters (`?token=`, `access_token`, `X-Amz-Signature`, `sig`, ...) are removed.
- Token patterns (Hugging Face `hf_`, GitHub `ghp_`/`github_pat_`, AWS access keys, Slack, GitLab,
  OpenAI-style `sk-`, private key blocks) are replaced by `<redacted:KIND>`.
- The values of secret-looking environment variables (`*TOKEN*`, `*SECRET*`, `*PASSWORD*`,
  `*_KEY`, `*CREDENTIAL*`) are replaced wherever they appear.
"""

from __future__ import annotations

import logging
import os
import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDACTED = "REDACTED"

# Query parameters whose value is a credential (compared in lower case).
SECRET_PARAMS = {
    "token",
    "access_token",
    "refresh_token",
    "id_token",
    "auth",
    "authorization",
    "apikey",
    "api_key",
    "api-key",
    "key",
    "secret",
    "client_secret",
    "password",
    "passwd",
    "pwd",
    "sig",
    "signature",
    "x-amz-signature",
    "x-amz-credential",
    "x-amz-security-token",
    "x-goog-signature",
    "x-goog-credential",
    "se",  # Azure SAS: with `sig`, the expiry of the signature
}

# (kind, pattern) of credentials found in free text (diffs, logs, configs).
TOKEN_PATTERNS: list[tuple[str, re.Pattern]] = [
    (
        "private_key",
        re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.S),
    ),
    ("huggingface_token", re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")),
    ("github_token", re.compile(r"\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{20,}\b")),
    ("github_token", re.compile(r"\bgithub_pat_[A-Za-z0-9_]{20,}\b")),
    ("gitlab_token", re.compile(r"\bglpat-[A-Za-z0-9_-]{20,}\b")),
    ("aws_access_key", re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")),
    (
        "aws_secret_key",
        re.compile(r"(?i)(aws_secret_access_key\s*[=:]\s*[\"']?)[A-Za-z0-9/+=]{40}"),
    ),
    ("slack_token", re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}\b")),
    ("api_key", re.compile(r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}\b")),
]

_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>`]+")
_SECRET_ENV = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|(^|_)KEY$|API_?KEY", re.I)
# Values too short or too common to replace blindly.
_MIN_ENV_SECRET = 8


def redact_url(url: str) -> str:
    """`url` without userinfo and with the values of token-like query parameters replaced."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if not parts.scheme or not parts.netloc:
        return url
    netloc = parts.netloc.rpartition("@")[2] if "@" in parts.netloc else parts.netloc
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in SECRET_PARAMS for k, _ in pairs):
            query = urlencode(
                [(k, REDACTED if k.lower() in SECRET_PARAMS else v) for k, v in pairs], safe="/:"
            )
    fragment = parts.fragment
    if fragment and "=" in fragment:  # OAuth implicit flow: #access_token=...
        pairs = parse_qsl(fragment, keep_blank_values=True)
        if any(k.lower() in SECRET_PARAMS for k, _ in pairs):
            fragment = urlencode(
                [(k, REDACTED if k.lower() in SECRET_PARAMS else v) for k, v in pairs]
            )
    return urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


def secret_env_values(environ=None) -> list[str]:
    """Values of secret-looking environment variables (longest first)."""
    environ = os.environ if environ is None else environ
    vals = {
        v
        for k, v in environ.items()
        if _SECRET_ENV.search(k) and len(v) >= _MIN_ENV_SECRET and not v.isdigit()
    }
    return sorted(vals, key=len, reverse=True)


def find_secrets(text: str) -> list[str]:
    """Kinds of the credentials found in `text` (one entry per occurrence)."""
    found = [kind for kind, pat in TOKEN_PATTERNS for _ in pat.finditer(text)]
    found += [
        "url_credentials" for m in _URL.finditer(text) if redact_url(m.group(0)) != m.group(0)
    ]
    found += ["environment_secret" for v in secret_env_values() for _ in range(text.count(v))]
    return found


def redact_text(text: str) -> str:
    """`text` with every URL redacted (`redact_url`), token patterns and secret environment
    values replaced by `<redacted:KIND>`."""
    if not text:
        return text
    for v in secret_env_values():
        text = text.replace(v, "<redacted:environment_secret>")
    text = _URL.sub(lambda m: redact_url(m.group(0)), text)
    for kind, pat in TOKEN_PATTERNS:
        keep = r"\g<1>" if pat.groups else ""  # aws_secret_access_key = <redacted>
        text = pat.sub(keep + f"<redacted:{kind}>", text)
    return text


class RedactingFormatter(logging.Formatter):
    """A log formatter whose output (message, arguments and tracebacks) is redacted."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))
