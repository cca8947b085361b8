"""Test utilities: real LiveKit server, tokens, tone audio."""

from mls_provider.testing.audio import (
    SAMPLE_RATE,
    TonePublisher,
    ToneRecorder,
    assert_silent_or_not_tone,
    describe,
    dominant_frequency,
    hears_tone,
    rms,
    tone_fraction,
    wait_for_no_tone,
    wait_for_tone,
)
from mls_provider.testing.livekit_server import (
    LiveKitServer,
    LiveKitServerError,
    find_livekit_server_binary,
)

__all__ = [
    "SAMPLE_RATE",
    "LiveKitServer",
    "LiveKitServerError",
    "TonePublisher",
    "ToneRecorder",
    "assert_silent_or_not_tone",
    "describe",
    "dominant_frequency",
    "find_livekit_server_binary",
    "hears_tone",
    "rms",
    "tone_fraction",
    "wait_for_no_tone",
    "wait_for_tone",
]
