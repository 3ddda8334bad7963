"""``openaigw-keygen NAME``: a new gateway key, and the gw.ini lines that accept it."""

from __future__ import annotations

import argparse
import hashlib
import re
import secrets
import sys
from typing import Optional, Sequence


def new_key() -> str:
    """A random key that looks like what SDK users expect (``sk-`` prefix), 256 bits."""
    return "sk-gw-" + secrets.token_urlsafe(32)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="openaigw-keygen",
        description="Print a new gateway key once, and the [consumer:NAME] section with its hash.",
    )
    parser.add_argument("name", help="the consumer's name (letters, digits, . _ -)")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", args.name):
        parser.error("the name may only hold letters, digits, '.', '_' and '-'")
    key = new_key()
    digest = hashlib.sha256(key.encode("ascii")).hexdigest()
    sys.stdout.write(
        "# The key, for the consumer only: it is not stored anywhere.\n"
        f"{key}\n\n"
        "# For gw.ini:\n"
        f"[consumer:{args.name}]\nkey_sha256 = {digest}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
