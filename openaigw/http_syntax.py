"""HTTP syntax shared by the configuration and the request path (RFC 9110)."""

from __future__ import annotations

import re

_TCHAR = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]"  # RFC 9110 5.6.2

TOKEN = re.compile(_TCHAR + "+")
"""A token (methods, header names, ``Connection`` options), in ``str``."""

TOKEN_BYTES = re.compile(_TCHAR.encode("ascii") + b"+")
"""The same, in ``bytes``."""
