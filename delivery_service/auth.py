"""Authentication: every call carries the caller's LiveKit access token.

The token (metadata ``authorization: Bearer <jwt>``) is verified as
``livekit.api.TokenVerifier`` does (PyJWT: HS256 with the deployment's API secret, issuer =
API key, ``exp`` required, with a leeway), but without its claim parsing, which raises
arbitrary errors on claims of unexpected types: this module reads the claims itself and
checks the type of each (a token signed with the right secret but with
``"roomJoin": "false"`` is refused, never answered INTERNAL). It requires
``video.roomJoin`` and a ``video.room``. The caller's identity and room come from the
token only.

Which grants make a participant a *key holder* (a member of the MLS group, able to derive
every member's media key) is the deployment's policy (``KeyHolderPolicy``): by default a
token that cannot subscribe (``canSubscribe: false``) or is ``hidden`` does not.
"""

from __future__ import annotations

import enum
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import jwt

from delivery_service.errors import PermissionDenied, Unauthenticated

BEARER = "bearer "
CACHE_SIZE = 10_000


class KeyHolderPolicy(enum.StrEnum):
    """Which tokens may join the MLS group (``--key-holders``)."""

    # participants that subscribe and are visible: canSubscribe not false, not hidden
    SUBSCRIBERS = "subscribers"
    # any token with roomJoin (recorders and hidden agents hold keys too)
    ALL = "all"


@dataclass(frozen=True)
class Caller:
    identity: str
    room: str
    expires_at: float | None = None  # wall-clock time the token expires
    can_subscribe: bool = True
    hidden: bool = False

    def may_hold_keys(self, policy: KeyHolderPolicy) -> str | None:
        """None if the policy lets this caller join the group, else why not."""
        if policy is KeyHolderPolicy.ALL:
            return None
        if not self.can_subscribe:
            return "the token does not grant canSubscribe"
        if self.hidden:
            return "the token is for a hidden participant"
        return None


class Authenticator:
    def __init__(self, api_key: str, api_secret: str, *, leeway: timedelta = timedelta(seconds=10)):
        if not api_key or not api_secret:
            raise ValueError("LiveKit API key and secret are required")
        self._secret = api_secret
        self._leeway = leeway.total_seconds()
        self.api_key = api_key
        # A member sends the same token with every call (a few per epoch): remember the
        # verified ones until they expire instead of checking the HMAC each time.
        self._verified: OrderedDict[str, tuple[Caller, float]] = OrderedDict()

    def authenticate(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> Caller:
        token = _bearer(metadata)
        return self.verify(token)

    def verify(self, token: str) -> Caller:
        cached = self._verified.get(token)
        if cached is not None:
            caller, expires = cached
            if time.time() < expires:
                self._verified.move_to_end(token)
                return caller
            del self._verified[token]
        caller, expires = self._verify(token)
        self._verified[token] = (caller, expires)
        if len(self._verified) > CACHE_SIZE:
            self._verified.popitem(last=False)
        return caller

    def _verify(self, token: str) -> tuple[Caller, float]:
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=["HS256"],
                issuer=self.api_key,
                leeway=self._leeway,
                options={"require": ["exp"]},
            )
        except jwt.ExpiredSignatureError as e:
            raise Unauthenticated("access token expired") from e
        except jwt.PyJWTError as e:
            raise Unauthenticated(f"invalid access token: {e}") from e
        if not isinstance(claims, dict):
            raise Unauthenticated("invalid access token: the claims are not an object")
        exp, identity, video = claims.get("exp"), claims.get("sub"), claims.get("video")
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            raise Unauthenticated("invalid access token: exp must be a number")
        if identity is not None and not isinstance(identity, str):
            raise Unauthenticated("invalid access token: sub must be a string")
        if video is None:
            raise PermissionDenied("the token does not grant room_join (no video grant)")
        if not isinstance(video, dict):
            raise Unauthenticated("invalid access token: video must be an object")
        room_join = _claim(video, "roomJoin", bool, False)
        room = _claim(video, "room", str, "")
        can_subscribe = _claim(video, "canSubscribe", bool, True)
        hidden = _claim(video, "hidden", bool, False)
        if not room_join:
            raise PermissionDenied("the token does not grant room_join")
        if not room:
            raise PermissionDenied("the token names no room")
        if not identity:
            raise PermissionDenied("the token carries no identity")
        caller = Caller(identity, room, float(exp), can_subscribe, hidden)
        return caller, float(exp) + self._leeway


def _claim(grants: dict[str, object], name: str, kind: type, default: object) -> Any:
    """A grant of ``video``, which must be of ``kind`` if present."""
    value = grants.get(name, default)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise Unauthenticated(
            f"invalid access token: video.{name} must be a {kind.__name__}, "
            f"not {type(value).__name__}"
        )
    return value


def _bearer(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    for key, value in metadata or ():
        if key.lower() == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            if text[: len(BEARER)].lower() != BEARER:
                raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
            return text[len(BEARER) :].strip()
    raise Unauthenticated("missing authorization metadata (Bearer LiveKit access token)")
