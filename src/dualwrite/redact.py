"""Secrets out of everything printed, logged or reported: one place that redacts them.

Passwords in URLs, `token=`-style query values, bearer tokens and JWTs are replaced with `***`
wherever a URL or a line of text leaves the process (startup output, logs, Sentry events).
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"

# Query parameters whose value is a credential (compared lower-case).
_SECRET_PARAMS = frozenset(
    {"token", "access_token", "password", "passwd", "pass", "secret", "key", "sslpassword", "auth"}
)

_HEAD = rf"\g<head>{MASK}"
# scheme://user:password@host -> scheme://user:***@host
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][\w+.-]*://[^\s/:@]*:)[^\s@/]+(?=@)")
# ?token=... &password=... (also inside logged request lines)
_SECRET_PARAM = re.compile(
    r"(?P<head>(?:^|[?&;\s])(?:" + "|".join(sorted(_SECRET_PARAMS)) + r")=)[^&\s\"'#]+",
    re.IGNORECASE,
)
_BEARER = re.compile(r"(?P<head>\bBearer\s+)[^\s\"',]+", re.IGNORECASE)
# A JWT anywhere (header.payload.signature, base64url, the header starts with eyJ).
_JWT = re.compile(r"\beyJ[\w-]*\.[\w-]+\.[\w-]*")
_PARAM_HINTS = tuple(f"{name}=" for name in _SECRET_PARAMS)


def redact_url(url: str) -> str:
    """The URL with its password and any credential query values replaced, fit to print."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return redact_text(url)
    netloc = parts.netloc
    if password is None and not parts.query:
        return url  # nothing to mask (and urlunsplit would drop the // of `memory://`)
    if password is not None:
        userinfo, _, hostport = netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        netloc = f"{user}:{MASK}@{hostport}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in _SECRET_PARAMS for k, _ in pairs):
            masked = [(k, MASK if k.lower() in _SECRET_PARAMS else v) for k, v in pairs]
            query = urlencode(masked, safe="*")
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def redact_text(text: str) -> str:
    """``text`` with URL passwords, credential query values, bearer tokens and JWTs masked."""
    # Every log line passes here (one per send): a pattern runs only where the text holds
    # what it needs to match, a substring test being far cheaper than a regex scan.
    # casefold(), not lower(): IGNORECASE also matches characters such as the long s.
    if "://" in text:
        text = _URL_PASSWORD.sub(_HEAD, text)
    folded = text.casefold()
    if "=" in text and any(hint in folded for hint in _PARAM_HINTS):
        text = _SECRET_PARAM.sub(_HEAD, text)
    if "bearer" in folded:
        text = _BEARER.sub(_HEAD, text)
    if "eyJ" in text:
        text = _JWT.sub(MASK, text)
    return text
