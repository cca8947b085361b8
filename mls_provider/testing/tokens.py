"""What an app's backend hands its participants: LiveKit access tokens (the DS accepts
the same) and, in authority mode, credentials from the app's identity authority."""

from __future__ import annotations

import datetime

from livekit import api

from mls_provider.authority import IdentityAuthority
from mls_provider.session import CredentialSource


def join_token(
    api_key: str,
    api_secret: str,
    identity: str,
    room: str,
    *,
    ttl: datetime.timedelta | None = None,
    name: str | None = None,
    room_join: bool = True,
    can_publish: bool = True,
    can_subscribe: bool = True,
    can_publish_data: bool = True,
) -> str:
    """A token for ``identity`` to join ``room``, signed with ``api_key``/``api_secret``."""
    grants = api.VideoGrants(
        room_join=room_join,
        room=room,
        can_publish=can_publish,
        can_subscribe=can_subscribe,
        can_publish_data=can_publish_data,
    )
    token = api.AccessToken(api_key, api_secret).with_identity(identity).with_grants(grants)
    if name is not None:
        token = token.with_name(name)
    if ttl is not None:
        token = token.with_ttl(ttl)
    return token.to_jwt()


def credential_source(authority: IdentityAuthority, identity: str, room: str) -> CredentialSource:
    """What ``SessionConfig.get_credential`` calls: the app's backend issuing ``identity`` a
    credential for ``room`` and the member's signature key."""

    async def issue(signature_key: bytes) -> bytes:
        return authority.issue(identity, room, signature_key)

    return issue
