"""Sine-tone publishing and decoded-audio analysis for end-to-end media tests.

An ``rtc.AudioStream`` keeps yielding 10 ms frames even when nothing can be decrypted
(jitter-buffer concealment / silence), so "frames arrived" proves nothing. These helpers let
tests assert on the decoded *content*: a tone is heard when the signal is loud enough, its
spectral peak is at the expected frequency and most of its power sits around that frequency.
Samples are float32 in [-1, 1).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import time

import numpy as np
import numpy.typing as npt
from livekit import rtc

__all__ = [
    "SAMPLE_RATE",
    "TonePublisher",
    "ToneRecorder",
    "assert_silent_or_not_tone",
    "describe",
    "dominant_frequency",
    "hears_tone",
    "quiet_frames",
    "rms",
    "tone_fraction",
    "wait_for_no_tone",
    "wait_for_tone",
]

SAMPLE_RATE = 48_000
FRAME_MS = 10
Samples = npt.NDArray[np.float32]

# Defaults for ``hears_tone``: a 0.3-amplitude sine decodes at rms ~0.2; silence / comfort
# noise stays far below 0.02, and Opus-decoded ciphertext is broadband noise, so its power is
# not concentrated around one frequency.
DEFAULT_MIN_RMS = 0.02
DEFAULT_MIN_FRACTION = 0.5


def rms(samples: Samples) -> float:
    """Root mean square of ``samples`` (0.0 for an empty array)."""
    if samples.size == 0:
        return 0.0
    return float(np.sqrt(np.mean(np.square(samples, dtype=np.float64))))


def _power_spectrum(
    samples: Samples, sample_rate: int
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    # Hann window: keeps a sine's leakage within a few bins of its peak.
    window = np.hanning(samples.size)
    spectrum = np.fft.rfft(samples.astype(np.float64) * window)
    power: npt.NDArray[np.float64] = (spectrum.real**2 + spectrum.imag**2).astype(np.float64)
    freqs = np.fft.rfftfreq(samples.size, d=1.0 / sample_rate).astype(np.float64)
    power[freqs < 20.0] = 0.0  # DC and sub-audio rumble
    return freqs, power


def dominant_frequency(samples: Samples, sample_rate: int = SAMPLE_RATE) -> float:
    """Frequency (Hz) of the largest FFT peak, ignoring DC (0.0 for too-short/empty input)."""
    if samples.size < 64:
        return 0.0
    freqs, power = _power_spectrum(samples, sample_rate)
    return float(freqs[int(np.argmax(power))])


def tone_fraction(
    samples: Samples, freq: float, *, bandwidth_hz: float = 20.0, sample_rate: int = SAMPLE_RATE
) -> float:
    """Share of the (windowed, DC-free) signal power within ``freq ± bandwidth_hz``."""
    if samples.size < 64:
        return 0.0
    freqs, power = _power_spectrum(samples, sample_rate)
    total = float(power.sum())
    if total <= 0.0:
        return 0.0
    return float(power[np.abs(freqs - freq) <= bandwidth_hz].sum()) / total


def hears_tone(
    samples: Samples,
    freq: float,
    *,
    tolerance_hz: float = 20.0,
    min_rms: float = DEFAULT_MIN_RMS,
    min_fraction: float = DEFAULT_MIN_FRACTION,
    sample_rate: int = SAMPLE_RATE,
) -> bool:
    """True if ``samples`` contain a clear tone at ``freq``.

    Loud enough (rms), peak within ``tolerance_hz`` and at least ``min_fraction`` of the power
    near ``freq`` — the last check stops noise that happens to peak near ``freq`` from passing.
    """
    if rms(samples) < min_rms:
        return False
    if abs(dominant_frequency(samples, sample_rate) - freq) > tolerance_hz:
        return False
    fraction = tone_fraction(samples, freq, bandwidth_hz=tolerance_hz, sample_rate=sample_rate)
    return fraction >= min_fraction


def quiet_frames(
    samples: Samples, *, threshold: float, frame_ms: int = FRAME_MS, sample_rate: int = SAMPLE_RATE
) -> int:
    """How many ``frame_ms`` frames of ``samples`` are quieter (rms) than ``threshold``:
    gaps in a continuous tone, as concealment or silence replaces undecryptable audio."""
    size = sample_rate * frame_ms // 1000
    frames = samples[: samples.size - samples.size % size].reshape(-1, size)
    if frames.size == 0:
        return 0
    levels = np.sqrt(np.mean(np.square(frames, dtype=np.float64), axis=1))
    return int(np.count_nonzero(levels < threshold))


def describe(samples: Samples, freq: float, sample_rate: int = SAMPLE_RATE) -> str:
    """One-line summary for assertion messages."""
    return (
        f"{samples.size / sample_rate:.2f} s, rms={rms(samples):.3g}, "
        f"peak={dominant_frequency(samples, sample_rate):.1f} Hz, "
        f"power near {freq:g} Hz={tone_fraction(samples, freq, sample_rate=sample_rate):.2f}"
    )


def assert_silent_or_not_tone(samples: Samples, freq: float, *, tolerance_hz: float = 20.0) -> None:
    """Fail if ``samples`` (which must not be empty) contain a tone at ``freq``."""
    assert samples.size > 0, "no decoded audio to check"
    assert not hears_tone(samples, freq, tolerance_hz=tolerance_hz), (
        f"unexpectedly heard the {freq:g} Hz tone: {describe(samples, freq)}"
    )


class TonePublisher:
    """Publishes a continuous, phase-continuous sine as a microphone track on ``room``."""

    def __init__(
        self,
        room: rtc.Room,
        frequency: float = 440.0,
        amplitude: float = 0.3,
        *,
        track_name: str = "tone",
        sample_rate: int = SAMPLE_RATE,
        queue_size_ms: int = 100,
    ) -> None:
        """``queue_size_ms`` is the AudioSource buffer: small keeps the tone's latency low."""
        if not 0.0 < amplitude <= 1.0:
            raise ValueError("amplitude must be in (0, 1]")
        self.room = room
        self.frequency = frequency
        self.amplitude = amplitude
        self.track_name = track_name
        self.sample_rate = sample_rate
        self._queue_size_ms = queue_size_ms
        self._source: rtc.AudioSource | None = None
        self._task: asyncio.Task[None] | None = None
        self.track: rtc.LocalAudioTrack | None = None
        self.publication: rtc.LocalTrackPublication | None = None

    @property
    def track_sid(self) -> str:
        """Server-assigned sid of the published track."""
        if self.publication is None:
            raise RuntimeError("TonePublisher not started")
        return self.publication.sid

    async def start(self) -> rtc.LocalTrackPublication:
        """Publish the track and start feeding the tone; returns the publication."""
        if self.publication is not None:
            return self.publication
        self._source = rtc.AudioSource(self.sample_rate, 1, queue_size_ms=self._queue_size_ms)
        self.track = rtc.LocalAudioTrack.create_audio_track(self.track_name, self._source)
        options = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
        self.publication = await self.room.local_participant.publish_track(self.track, options)
        self._task = asyncio.create_task(self._feed(self._source), name="tone-publisher")
        return self.publication

    async def _feed(self, source: rtc.AudioSource) -> None:
        n = self.sample_rate * FRAME_MS // 1000
        step = 2.0 * math.pi * self.frequency / self.sample_rate
        phase = 0.0
        offsets = np.arange(n, dtype=np.float64) * step
        scale = self.amplitude * 32767.0
        while True:
            pcm = (np.sin(phase + offsets) * scale).astype(np.int16)
            # Wrap to keep float precision over long runs; the sine stays phase-continuous.
            phase = (phase + n * step) % (2.0 * math.pi)
            frame = rtc.AudioFrame(pcm.tobytes(), self.sample_rate, 1, n)
            await source.capture_frame(frame)  # paces us at real time once the queue is full

    async def stop(self, *, unpublish: bool = True) -> None:
        """Stop feeding, unpublish (if asked and still connected) and release the source.

        Pass ``unpublish=False`` right before ``room.disconnect()``: unpublishing starts a
        renegotiation that the disconnect then aborts (a harmless but noisy SDK error log).
        """
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if unpublish and self.publication is not None and self.room.isconnected():
            with contextlib.suppress(Exception):  # best effort: the room may be going away
                await self.room.local_participant.unpublish_track(self.publication.sid)
        if self._source is not None:
            await self._source.aclose()
            self._source = None


class ToneRecorder:
    """Decodes a remote audio track and keeps the most recent samples with receive times."""

    def __init__(
        self, track: rtc.Track, *, capacity_s: float = 10.0, sample_rate: int = SAMPLE_RATE
    ) -> None:
        """Starts reading immediately; ``capacity_s`` bounds the ring buffer."""
        self.sample_rate = sample_rate
        self._max_samples = int(capacity_s * sample_rate)
        # (monotonic receive time, samples) per decoded frame, oldest first.
        self._chunks: collections.deque[tuple[float, Samples]] = collections.deque()
        self._buffered = 0
        self.frames_received = 0
        self.started_at = time.monotonic()
        self._stream = rtc.AudioStream(track, sample_rate=sample_rate, num_channels=1)
        self._task = asyncio.create_task(self._run(), name="tone-recorder")

    async def _run(self) -> None:
        async for event in self._stream:
            pcm = np.frombuffer(event.frame.data, dtype=np.int16)
            self._chunks.append((time.monotonic(), pcm.astype(np.float32) / 32768.0))
            self._buffered += pcm.size
            self.frames_received += 1
            while self._buffered - self._chunks[0][1].size >= self._max_samples:
                self._buffered -= self._chunks.popleft()[1].size

    def window(self, seconds: float) -> Samples:
        """The last ``seconds`` of decoded audio (shorter if not that much was received)."""
        wanted = int(seconds * self.sample_rate)
        parts: list[Samples] = []
        have = 0
        for _, chunk in reversed(self._chunks):
            if have >= wanted:
                break
            parts.append(chunk)
            have += chunk.size
        if not parts:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(parts[::-1])[-wanted:]

    def since(self, t: float) -> Samples:
        """All buffered audio received at or after monotonic time ``t``."""
        parts = [chunk for ts, chunk in self._chunks if ts >= t]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)

    async def aclose(self) -> None:
        """Stop decoding and release the stream."""
        await self._stream.aclose()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def _wait_until_heard(
    recorder: ToneRecorder, freq: float, timeout: float, window_s: float, want: bool
) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    t0 = time.monotonic()
    while True:
        # Only judge full windows of audio received after the call, never stale samples.
        needed = int(window_s * recorder.sample_rate)
        samples = recorder.since(t0)[-needed:]
        if samples.size >= needed * 0.95 and hears_tone(samples, freq) == want:
            return True
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.05)


async def wait_for_tone(
    recorder: ToneRecorder, freq: float, timeout: float, *, window_s: float = 0.3
) -> bool:
    """Wait until the last ``window_s`` of newly decoded audio contains the tone."""
    return await _wait_until_heard(recorder, freq, timeout, window_s, want=True)


async def wait_for_no_tone(
    recorder: ToneRecorder, freq: float, timeout: float, *, window_s: float = 0.3
) -> bool:
    """Wait until the last ``window_s`` of newly decoded audio does not contain the tone."""
    return await _wait_until_heard(recorder, freq, timeout, window_s, want=False)
