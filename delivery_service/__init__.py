"""The livekit-mls delivery service: orders and relays MLS handshakes for LiveKit rooms."""
