"""Logins for the web page: a shared token (from an env var) or named users with PBKDF2 password hashes.

Make a hash for `[web.users]` in grandrounds.toml:

    python -m web.auth NAME          # asks for the password twice, prints the TOML line
"""
from __future__ import annotations

import hashlib
import hmac
import secrets

ALGO = "pbkdf2_sha256"
ITERATIONS = 600_000  # OWASP 2023 guidance for PBKDF2-HMAC-SHA256


def hash_password(password: str, *, iterations: int = ITERATIONS, salt: str | None = None) -> str:
    """`pbkdf2_sha256$ITERATIONS$SALT$HASH` (salt and hash in hex), the format `settings.web.users` holds."""
    if not password:
        raise ValueError("empty password")
    salt = salt or secrets.token_hex(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), iterations)
    return f"{ALGO}${iterations}${salt}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    """Constant-time check of a password against a stored hash; a malformed hash never matches."""
    try:
        algo, iterations, salt, want = stored.split("$")
        n = int(iterations)
    except ValueError:
        return False
    if algo != ALGO or n < 1 or not salt or not want:
        return False
    got = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), n).hex()
    return hmac.compare_digest(got, want)


def check_token(given: str, expected: str | None) -> bool:
    return bool(expected) and bool(given) and hmac.compare_digest(given.encode(), expected.encode())


def _main(argv: list[str] | None = None) -> int:
    import getpass
    import json
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m web.auth NAME   (prints a line for [web.users] in grandrounds.toml)",
              file=sys.stderr)
        return 2
    pw = getpass.getpass(f"password for {args[0]}: ")
    if not pw or pw != getpass.getpass("again: "):
        print("error: the passwords are empty or differ", file=sys.stderr)
        return 1
    print("[web.users]")
    print(f"{json.dumps(args[0])} = {json.dumps(hash_password(pw))}")  # a JSON string is a TOML basic string
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
