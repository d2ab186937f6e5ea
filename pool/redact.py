"""URLs made safe to store, serve and log.

A chain node's URL often carries an API key in its path (``https://host/v3/<key>``) or its
query, a Redis or MongoDB URL a password in its userinfo; error texts of the HTTP stack repeat
them (``... with url: /v3/<key> (Caused by ...)``). :func:`redact_urls` keeps the scheme, the
host and the port of every URL in a text and masks the rest, so a failure reason, a timeline
note, a log line or the settings dump says *which* node failed without handing out the key.
It runs where such text is stored (the store's notes, the reports' reasons, finalize's
failure), where it is logged (:class:`RedactFilter`, installed by the ``workerpool`` command)
and in :meth:`pool.settings.Settings.public`.
"""

from __future__ import annotations

import logging
import re

MASK = "***"
# scheme://[userinfo@]host[:port][/path][?query][#fragment], up to a space or a quote
_URL = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://"
    r"(?:(?P<userinfo>[^\s/@'\"<>]*)@)?"
    r"(?P<host>\[[0-9A-Fa-f:.]+\]|[^\s/:?#'\"<>@]*)"
    r"(?P<port>:\d+)?"
    r"(?P<rest>[/?#][^\s'\"<>]*)?"
)
# urllib3 / requests: "HTTPConnectionPool(host='h', port=1): Max retries exceeded with url: /v3/k"
_URL_PATH = re.compile(r"(?P<lead>\burl: )(?P<path>/[^\s'\"<>]*)")


def _url(match: re.Match[str]) -> str:
    out = f"{match['scheme']}://"
    if match["userinfo"]:
        out += f"{MASK}@"
    out += match["host"] + (match["port"] or "")
    rest = match["rest"] or ""
    if rest and rest != "/":
        out += "/" + MASK
    return out


def redact_urls(text: str) -> str:
    """``text`` with every URL cut to its scheme, host and port (userinfo, path, query and
    fragment masked with ``***``)."""
    if "://" not in text and "url: /" not in text:
        return text
    text = _URL.sub(_url, text)
    return _URL_PATH.sub(lambda m: m["lead"] + ("/" if m["path"] == "/" else "/" + MASK), text)


class RedactFilter(logging.Filter):
    """Masks URLs (:func:`redact_urls`) in a log record's message and exception text before
    any handler writes it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format: leave it to the handler's own error path
            return True
        clean = redact_urls(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            clean = redact_urls(text)
            if clean != text:
                record.exc_text = clean
                record.exc_info = None
        return True
