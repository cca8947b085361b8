"""Authentication: every call carries the caller's LiveKit access token.

The token (metadata ``authorization: Bearer <jwt>``) is verified with
``livekit.api.TokenVerifier`` against the deployment's API key and secret. The verifier
checks signature, issuer and expiry; it does not check grants, so this module requires
``video.room_join`` and a ``video.room`` itself. The caller's identity and room come
from the token only.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import jwt
from livekit import api

from delivery_service.errors import PermissionDenied, Unauthenticated

BEARER = "bearer "
CACHE_SIZE = 10_000


@dataclass(frozen=True)
class Caller:
    identity: str
    room: str


class Authenticator:
    def __init__(self, api_key: str, api_secret: str, *, leeway: timedelta = timedelta(seconds=10)):
        if not api_key or not api_secret:
            raise ValueError("LiveKit API key and secret are required")
        self._verifier = api.TokenVerifier(api_key, api_secret, leeway=leeway)
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
            claims = self._verifier.verify(token)
        except jwt.ExpiredSignatureError as e:
            raise Unauthenticated("access token expired") from e
        except jwt.PyJWTError as e:
            raise Unauthenticated(f"invalid access token: {e}") from e
        except ValueError as e:
            raise Unauthenticated(f"invalid access token: {e}") from e
        video = claims.video
        if video is None or not video.room_join:
            raise PermissionDenied("the token does not grant room_join")
        if not video.room:
            raise PermissionDenied("the token names no room")
        if not claims.identity:
            raise PermissionDenied("the token carries no identity")
        # TokenVerifier requires `exp`; read it back without re-checking the signature
        exp = float(jwt.decode(token, options={"verify_signature": False})["exp"])
        return Caller(identity=claims.identity, room=video.room), exp + self._leeway


def _bearer(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    for key, value in metadata or ():
        if key.lower() == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            if text[: len(BEARER)].lower() != BEARER:
                raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
            return text[len(BEARER) :].strip()
    raise Unauthenticated("missing authorization metadata (Bearer LiveKit access token)")
