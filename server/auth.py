"""API keys and principals: who is calling, and what they may reach.

Keys file: one `<key> <principal>` per line, principal `user:<id>` or `admin`; `#` comments
and blank lines are ignored. Callers send `authorization: Bearer <key>` or `x-api-key: <key>`.
Keys are held only as SHA-256 digests. Without a keys file the server runs in *open local
mode*: every caller is trusted, may name any user and may call admin RPCs — for a single
machine bound to localhost only.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from nsam.server.errors import InvalidArgument, PermissionDenied, Unauthenticated

USER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")


def check_user_id(user: str) -> str:
    if not USER_ID.match(user):
        raise InvalidArgument(
            "user: 1-128 characters of letters, digits and . _ @ -, starting with a letter "
            f"or digit (got {user[:40]!r})")
    return user


@dataclass(frozen=True)
class Principal:
    """The authenticated caller: one user, an admin, or anyone (open local mode)."""

    user: str | None = None
    admin: bool = False
    open: bool = False

    def resolve_user(self, requested: str) -> str:
        """The user a request acts for: the named one, or the caller's own when empty."""
        if not requested:
            if self.user is None:
                raise InvalidArgument("user: required (this caller has no user of its own)")
            return self.user
        check_user_id(requested)
        self.require_user(requested)
        return requested

    def require_user(self, user: str) -> None:
        if not (self.open or self.admin or self.user == user):
            raise PermissionDenied("this key may only reach its own user's sessions and memory")

    def require_admin(self) -> None:
        if not (self.open or self.admin):
            raise PermissionDenied("this RPC needs an admin key")


OPEN = Principal(open=True)


class KeysFileError(ValueError):
    """A keys file that cannot be used; the message names the file and line."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _parse_principal(text: str, where: str) -> Principal:
    if text == "admin":
        return Principal(admin=True)
    if text.startswith("user:") and USER_ID.match(text[5:]):
        return Principal(user=text[5:])
    raise KeysFileError(f"{where}: principal must be 'admin' or 'user:<id>', got {text[:40]!r}")


class ApiKeys:
    """Maps presented keys to principals; `None` keys = open local mode."""

    def __init__(self, keys: dict[bytes, Principal] | None):
        self._keys = keys

    @classmethod
    def open_mode(cls) -> "ApiKeys":
        return cls(None)

    @classmethod
    def from_lines(cls, lines: Iterable[str], source: str = "<keys>") -> "ApiKeys":
        keys: dict[bytes, Principal] = {}
        for n, raw in enumerate(lines, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2:
                raise KeysFileError(f"{source}:{n}: expected '<key> <principal>', got {len(parts)} fields")
            keys[_digest(parts[0])] = _parse_principal(parts[1], f"{source}:{n}")
        if not keys:
            raise KeysFileError(f"{source}: no keys (remove the file to run in open local mode)")
        return cls(keys)

    @classmethod
    def from_file(cls, path: Path | None) -> "ApiKeys":
        if path is None:
            return cls.open_mode()
        lines = []
        for n, raw in enumerate(path.read_bytes().splitlines(), 1):
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise KeysFileError(f"{path}:{n}: not UTF-8 text") from None
        return cls.from_lines(lines, str(path))

    @property
    def open(self) -> bool:
        return self._keys is None

    def principal(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Principal:
        """The caller named by the request metadata; UNAUTHENTICATED without a known key."""
        if self._keys is None:
            return OPEN
        key = None
        for name, value in metadata or ():
            if isinstance(value, bytes):
                continue
            if name == "authorization" and value[:7].lower() == "bearer ":
                key = value[7:].strip()
            elif name == "x-api-key":
                key = value.strip()
        if not key:
            raise Unauthenticated("missing API key: send 'authorization: Bearer <key>' or 'x-api-key'")
        principal = self._keys.get(_digest(key))
        if principal is None:
            raise Unauthenticated("unknown API key")
        return principal
