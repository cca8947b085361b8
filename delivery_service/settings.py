"""Configuration of a delivery service process (flags and environment: see cli.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from delivery_service.auth import KeyHolderPolicy
from delivery_service.limits import Limits
from delivery_service.ordering import OrderingConfig
from delivery_service.presence import DEFAULT_PRESENCE_TIMEOUT
from delivery_service.store.base import DEFAULT_LOG_RETENTION

DS_IDENTITY = "livekit-mls-ds"
"""Credential identity of the DS in the groups' external senders list."""


@dataclass
class Settings:
    livekit_api_key: str
    livekit_api_secret: str = field(repr=False)
    # LiveKit server URL: when set, members' disconnect reports are checked against it
    livekit_url: str = ""
    grpc_listen: str = "127.0.0.1:50051"
    http_listen: str = "127.0.0.1:8089"
    store: str = "sqlite:///livekit-mls-ds.db"
    # file holding the DS signature secret key (hex); empty: generate once, keep in the store
    ds_key_file: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    # with a client CA, clients must present a certificate it signed (mTLS)
    tls_client_ca: str = ""
    limits: Limits = field(default_factory=Limits)
    ordering: OrderingConfig = field(default_factory=OrderingConfig)
    # which tokens may join the MLS group (become key holders)
    key_holders: KeyHolderPolicy = KeyHolderPolicy.SUBSCRIBERS
    # seconds a member's event stream may be gone before it is removed (0: presence off)
    presence_timeout: float = DEFAULT_PRESENCE_TIMEOUT
    log_retention: int = DEFAULT_LOG_RETENTION
    stream_queue_size: int = 1024
    shutdown_grace: float = 5.0
