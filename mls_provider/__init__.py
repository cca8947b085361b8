"""livekit-mls: end-to-end encryption keys for LiveKit rooms, agreed by MLS (RFC 9420).

    from mls_provider import MlsE2EE

The pieces, layer by layer: ``mls`` (the Rust MLS engine), ``keys`` (the key schedule),
``transport`` (the delivery service client), ``session`` (one room's group lifecycle),
``livekit_adapter`` (keys into LiveKit), ``e2ee`` (the facade), ``testing`` (the
integration test harness).
"""

from typing import TYPE_CHECKING, Any

from mls_provider.session import EpochInfo, MlsSession, SessionConfig
from mls_provider.sinks import HeadlessKeySink, KeySink

if TYPE_CHECKING:
    from mls_provider.e2ee import MlsE2EE

__all__ = ["EpochInfo", "HeadlessKeySink", "KeySink", "MlsE2EE", "MlsSession", "SessionConfig"]


def __getattr__(name: str) -> Any:
    # the facade pulls in the LiveKit SDK's native library: load it only when asked for
    if name == "MlsE2EE":
        from mls_provider.e2ee import MlsE2EE

        return MlsE2EE
    raise AttributeError(f"module 'mls_provider' has no attribute {name!r}")
