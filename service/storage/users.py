"""Named users and their API tokens, in the ledger (README "Users and roles").

Passwords are argon2id hashes (argon2-cffi, its default parameters); API tokens are 32 random bytes
shown once, stored as SHA-256 (a slow hash protects guessable secrets, not random ones). Repeated wrong
passwords slow the account down: after `LOCK_AFTER` consecutive failures each further attempt must wait
`LOCK_SECONDS` after the last one, and every failure is an audit row. Every change to a user or token
is an audit row naming who made it.
"""
from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import func, select

from dicom_fusion.service.errors import ActionRefusedError
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import ApiToken, Role, User, WebSession, utcnow

LOCK_AFTER = 5  # consecutive wrong passwords before the account is slowed down
LOCK_SECONDS = 30.0  # then: at least this long between attempts
MIN_PASSWORD = 10
TOKEN_PREFIX = "dfu_"  # tells a user token from the service token (api.token) in a support ticket
_USERNAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,63}$")
_hasher = PasswordHasher()


@dataclass(frozen=True)
class Principal:
    """Who is calling: a named user, or the service token (an operator for automation)."""

    username: str
    display_name: str
    role: Role
    organization: str = ""


@dataclass(frozen=True)
class UserInfo:
    username: str
    display_name: str
    organization: str
    role: Role
    disabled: bool
    tokens: int  # active API tokens
    created_at: datetime


@dataclass(frozen=True)
class TokenInfo:
    id: int
    name: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class SignInError(ActionRefusedError):
    """Wrong username or password, a disabled user, or too many failures: one message for all (no hint which)."""


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _principal(user: User) -> Principal:
    return Principal(user.username, user.display_name, Role(user.role), user.organization)


class Users:
    """User and token operations on a ledger; each one short transaction with its audit row."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def add(self, username: str, *, password: str, role: Role, display_name: str, organization: str = "",
            by: str) -> Principal:
        username = username.strip().lower()
        if not _USERNAME_RE.match(username):
            raise ActionRefusedError(f"username {username!r}: 2-64 of a-z 0-9 . _ -, starting with a letter or digit")
        if not display_name.strip():
            raise ActionRefusedError("a user needs a display name: it is what approved SRs and reports carry")
        _check_password(password)
        with self.ledger.transaction() as s:
            if s.scalar(select(User.id).where(User.username == username)) is not None:
                raise ActionRefusedError(f"user {username} exists; use `users passwd` or `users disable`")
            user = User(username=username, display_name=" ".join(display_name.split())[:128],
                        organization=organization.strip()[:128], role=Role(role), password_hash=_hasher.hash(password),
                        disabled=False, failed_logins=0, created_at=utcnow())
            s.add(user)
            s.flush()
            self.ledger._audit(s, "user", user.id, "user_added", f"user={username} role={role} by={by}")
            return _principal(user)

    def set_password(self, username: str, password: str, *, by: str) -> None:
        _check_password(password)
        with self.ledger.transaction() as s:
            user = self._get(s, username)
            user.password_hash = _hasher.hash(password)
            user.failed_logins, user.last_failed_at = 0, None
            self.ledger._audit(s, "user", user.id, "password_changed", f"user={user.username} by={by}")

    def set_disabled(self, username: str, disabled: bool, *, by: str) -> None:
        """Disabling also revokes every API token of the user."""
        with self.ledger.transaction() as s:
            user = self._get(s, username)
            user.disabled = disabled
            if disabled:
                for t in s.scalars(select(ApiToken).where(ApiToken.user_id == user.id, ApiToken.revoked_at.is_(None))):
                    t.revoked_at = utcnow()
            self.ledger._audit(s, "user", user.id, "user_disabled" if disabled else "user_enabled",
                               f"user={user.username} by={by}")

    def list(self) -> list[UserInfo]:
        with self.ledger.session() as s:
            users = list(s.scalars(select(User).order_by(User.username)))
            counts = {uid: int(n) for uid, n in s.execute(
                select(ApiToken.user_id, func.count(ApiToken.id)).where(ApiToken.revoked_at.is_(None))
                .group_by(ApiToken.user_id)).all()}
            return [UserInfo(u.username, u.display_name, u.organization, Role(u.role), u.disabled,
                             counts.get(u.id, 0), u.created_at) for u in users]

    def authenticate(self, username: str, password: str, *, now: datetime | None = None) -> Principal:
        """The user, if the password is right; :class:`SignInError` otherwise (audited; slowed down after
        `LOCK_AFTER` consecutive failures)."""
        now = now or utcnow()
        refused = SignInError("wrong username or password, or the account is disabled or cooling down "
                              f"after {LOCK_AFTER} failures ({LOCK_SECONDS:.0f} s)")
        with self.ledger.transaction() as s:
            user = s.scalar(select(User).where(User.username == username.strip().lower()))
            if user is None:
                _hasher.hash(password)  # the same work as a real check: timing does not reveal usernames
                raise refused
            cooling = (user.failed_logins >= LOCK_AFTER and user.last_failed_at is not None
                       and now - user.last_failed_at < timedelta(seconds=LOCK_SECONDS))
            ok = False
            if not cooling and not user.disabled:
                try:
                    ok = _hasher.verify(user.password_hash, password)
                except (VerifyMismatchError, VerificationError, InvalidHashError):
                    ok = False
            if ok:
                user.failed_logins, user.last_failed_at = 0, None
                if _hasher.check_needs_rehash(user.password_hash):
                    user.password_hash = _hasher.hash(password)
                self.ledger._audit(s, "user", user.id, "signed_in", f"user={user.username}")
                return _principal(user)
            user.failed_logins += 1
            user.last_failed_at = now
            why = "disabled" if user.disabled else "cooling down" if cooling else "wrong password"
            self.ledger._audit(s, "user", user.id, "sign_in_refused",
                               f"user={user.username} {why} failures={user.failed_logins}")
        raise refused

    # ---- API tokens -----------------------------------------------------------------------------------
    def create_token(self, username: str, name: str, *, by: str) -> tuple[int, str]:
        """A new API token for the user: (its id, the token). The token is returned only here."""
        name = name.strip()[:64] or "api"
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self.ledger.transaction() as s:
            user = self._get(s, username)
            if user.disabled:
                raise ActionRefusedError(f"user {user.username} is disabled; enable it first")
            row = ApiToken(user_id=user.id, name=name, token_hash=_token_hash(token), created_at=utcnow())
            s.add(row)
            s.flush()
            self.ledger._audit(s, "user", user.id, "token_created", f"user={user.username} token={row.id} by={by}")
            return row.id, token

    def revoke_token(self, token_id: int, *, by: str) -> None:
        with self.ledger.transaction() as s:
            row = s.get(ApiToken, token_id)
            if row is None or row.revoked_at is not None:
                raise ActionRefusedError(f"no active API token {token_id}; `dicom-fusion users list` shows users")
            row.revoked_at = utcnow()
            self.ledger._audit(s, "user", row.user_id, "token_revoked", f"token={token_id} by={by}")

    def tokens(self, username: str) -> list[TokenInfo]:
        """The user's API tokens (never their values: only hashes are stored)."""
        with self.ledger.session() as s:
            user = self._get(s, username)
            rows = s.scalars(select(ApiToken).where(ApiToken.user_id == user.id).order_by(ApiToken.id))
            return [TokenInfo(t.id, t.name, t.created_at, t.last_used_at, t.revoked_at) for t in rows]

    def revoke_own_token(self, username: str, token_id: int) -> None:
        """A user revokes one of their own tokens (someone else's id is "no such token", never a hint)."""
        with self.ledger.session() as s:
            user = self._get(s, username)
            owner = s.scalar(select(ApiToken.user_id).where(ApiToken.id == token_id))
        if owner != user.id:
            raise ActionRefusedError(f"no active API token {token_id} of yours")
        self.revoke_token(token_id, by=username)

    def active_user(self, username: str) -> Principal | None:
        """The enabled user of that name (a trusted reverse proxy names who signed in); None otherwise."""
        with self.ledger.session() as s:
            user = s.scalar(select(User).where(User.username == username.strip().lower()))
        return None if user is None or user.disabled else _principal(user)

    def resolve_token(self, token: str) -> Principal | None:
        """The active user behind an API token; None for an unknown, revoked or disabled one."""
        if not token.startswith(TOKEN_PREFIX):
            return None
        with self.ledger.transaction() as s:
            row = s.execute(select(ApiToken, User).join(User, User.id == ApiToken.user_id).where(
                ApiToken.token_hash == _token_hash(token), ApiToken.revoked_at.is_(None))).first()
            if row is None or row[1].disabled:
                return None
            row[0].last_used_at = utcnow()
            return _principal(row[1])

    # ---- dashboard sessions -----------------------------------------------------------------------------
    def start_session(self, username: str, *, hours: float) -> tuple[str, str]:
        """A signed-in browser: (the cookie value, the session's CSRF token). Call after `authenticate`."""
        cookie, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        now = utcnow()
        with self.ledger.transaction() as s:
            user = self._get(s, username)
            s.add(WebSession(user_id=user.id, session_hash=_token_hash(cookie), csrf_token=csrf, created_at=now,
                             expires_at=now + timedelta(hours=hours)))
        return cookie, csrf

    def resolve_session(self, cookie: str) -> tuple[Principal, str] | None:
        """The signed-in user and the session's CSRF token; None once signed out, expired or disabled."""
        with self.ledger.session() as s:
            row = s.execute(select(WebSession, User).join(User, User.id == WebSession.user_id).where(
                WebSession.session_hash == _token_hash(cookie), WebSession.ended_at.is_(None),
                WebSession.expires_at > utcnow())).first()
        if row is None or row[1].disabled:
            return None
        return _principal(row[1]), row[0].csrf_token

    def end_session(self, cookie: str) -> None:
        with self.ledger.transaction() as s:
            row = s.scalar(select(WebSession).where(WebSession.session_hash == _token_hash(cookie)))
            if row is not None and row.ended_at is None:
                row.ended_at = utcnow()
                self.ledger._audit(s, "user", row.user_id, "signed_out", "")

    @staticmethod
    def _get(s: object, username: str) -> User:
        user = s.scalar(select(User).where(User.username == username.strip().lower()))  # type: ignore[attr-defined]
        if user is None:
            raise ActionRefusedError(f"no user {username}; `dicom-fusion users list` shows them")
        return user  # type: ignore[no-any-return]


def _check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise ActionRefusedError(f"a password needs at least {MIN_PASSWORD} characters")
