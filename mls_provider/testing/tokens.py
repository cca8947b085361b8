"""LiveKit access tokens as a LiveKit deployment mints them (the DS accepts the same)."""

from __future__ import annotations

import datetime

from livekit import api


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
