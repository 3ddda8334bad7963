"""Secret references in configuration values: ``$ENV://``, ``$FILE://``, ``$CREDENTIAL://``.

A reference may stand anywhere in a value (``Bearer $ENV://OPENAI_API_KEY``).  A
reference that cannot be resolved is an error naming the reference, never the secret.
"""

from __future__ import annotations

import os
import re
from typing import Mapping, Optional

_REFERENCE = re.compile(
    r"\$(?P<kind>ENV|FILE|CREDENTIAL)://(?P<name>[^\s]+)", re.IGNORECASE
)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CREDENTIAL_NAME = re.compile(r"[A-Za-z0-9_.@:-]+")


class SecretError(Exception):
    """A secret reference could not be resolved; the message names only the reference."""


def has_reference(value: str) -> bool:
    """Whether ``value`` holds at least one secret reference."""
    return _REFERENCE.search(value) is not None


def resolve(value: str, environ: Optional[Mapping[str, str]] = None) -> str:
    """Replace every secret reference in ``value`` by the secret it names."""
    env = os.environ if environ is None else environ

    def substitute(match: "re.Match[str]") -> str:
        kind, name = match.group("kind").upper(), match.group("name")
        reference = match.group(0)
        if kind == "ENV":
            if not _ENV_NAME.fullmatch(name):
                raise SecretError(f"{reference}: not an environment variable name")
            if name not in env:
                raise SecretError(f"{reference}: environment variable {name} is not set")
            secret = env[name]
        elif kind == "FILE":
            if not name.startswith("/"):
                raise SecretError(f"{reference}: the path must be absolute ($FILE:///path)")
            secret = _read(reference, name)
        else:
            if not _CREDENTIAL_NAME.fullmatch(name) or name in (".", ".."):
                raise SecretError(f"{reference}: not a credential name")
            directory = env.get("CREDENTIALS_DIRECTORY")
            if not directory:
                raise SecretError(
                    f"{reference}: $CREDENTIALS_DIRECTORY is not set"
                    " (LoadCredential= in the systemd unit provides it)"
                )
            secret = _read(reference, os.path.join(directory, name))
        if not secret:
            raise SecretError(f"{reference}: the secret is empty")
        return secret

    return _REFERENCE.sub(substitute, value)


def _read(reference: str, path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().rstrip("\r\n")
    except OSError as e:
        raise SecretError(f"{reference}: cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise SecretError(f"{reference}: {path} is not UTF-8 text") from None
