"""Users' bearer tokens: made here, stored hashed in the LMO's store, checked on every request.

Why SHA-256 and not a slow password hash: a token is 256 random bits made by the LMO, not a
password a person chose, so there is nothing to guess and no dictionary to slow down; a fast
hash lets the LMO look a token up by its digest on every request (the digest column is unique).
The token itself is shown once, when created, and never stored.

A token reads ``lmt_<id>_<secret>``: the public id (what ``livemig token list`` shows and
``revoke`` takes) travels inside it, so a leaked token can be found in the list, while only its
digest is compared.
"""

from __future__ import annotations

import hashlib
import re
import secrets

from livemig.control.store import Store, TokenRecord
from livemig.errors import InvalidRequest
from livemig.security.access import TokenCheck, User, UserRole

PREFIX = "lmt"
_TOKEN = re.compile(r"^lmt_([0-9a-f]{12})_[A-Za-z0-9_-]{43}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._@-]{0,127}$")


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_role(value: str) -> UserRole:
    try:
        return UserRole(value)
    except ValueError:
        raise InvalidRequest(f"unknown role {value!r}: one of {', '.join(r.value for r in UserRole)}") from None


def issue(store: Store, name: str, role: UserRole | str) -> tuple[TokenRecord, str]:
    """A new token for ``name`` with ``role``: its record, and the token (shown this once)."""
    if not _NAME.fullmatch(name):
        raise InvalidRequest(f"bad token name {name!r}: letters, digits, space and ._@- (at most 128)")
    role = parse_role(role) if isinstance(role, str) else role
    token_id = secrets.token_hex(6)
    token = f"{PREFIX}_{token_id}_{secrets.token_urlsafe(32)}"
    return store.add_token(token_id, name, role.value, digest(token)), token


def checker(store: Store) -> TokenCheck:
    """The LMO's token check: the user of a live token, None for an unknown, malformed or revoked one."""

    def check(token: str) -> User | None:
        if not _TOKEN.fullmatch(token):
            return None
        record = store.token_by_digest(digest(token))
        if record is None:
            return None
        return User(record.id, record.name, UserRole(record.role))

    return check
