"""The key schedule: from an MLS epoch to the keys LiveKit encrypts media with.

Pure functions, no transport. Byte-exact definitions and test vectors are in
docs/protocol.md ("Key schedule"); ``tests/test_keys.py`` checks both agree.

For epoch ``e`` and participant identity ``id``::

    material(id, e) = MLS-Exporter("livekit-mls v1 sender key", UTF-8(id), 32)
    key_index(e)    = e mod R                  (R = key ring size, same for the whole room)
    frame_key       = HKDF-SHA256(IKM=material, salt=ratchet_salt, info=128 zero bytes, L=16)

``material`` is what the key provider hands to LiveKit's ``set_key(id, material, index)``;
LiveKit's frame cryptor derives ``frame_key`` itself (KeyDerivationFunction.HKDF). The
frame key is computed here only for test vectors and cross-checks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

EXPORTER_LABEL = b"livekit-mls v1 sender key"
"""MLS-Exporter label for per-participant sender key material (versioned)."""

MATERIAL_LENGTH = 32
"""Bytes of key material exported per participant and epoch."""

DEFAULT_RING_SIZE = 16
MAX_RING_SIZE = 256
"""LiveKit's maximum key ring size (the frame trailer carries the index in one byte)."""

LIVEKIT_RATCHET_SALT = b"LKFrameEncryptionKey"
"""LiveKit's default ``KeyProviderOptions.ratchet_salt``."""

VERIFICATION_GROUPS = 6
VERIFICATION_GROUP_DIGITS = 5

Exporter = Callable[[bytes, bytes, int], bytes]
"""``MLS-Exporter(label, context, length)`` of one epoch, e.g. ``Group.export_secret``."""


def check_ring_size(ring_size: int) -> int:
    """Validates a key ring size: 2..256 (two epochs are live during a transition)."""
    if not 2 <= ring_size <= MAX_RING_SIZE:
        raise ValueError(f"key ring size must be 2..{MAX_RING_SIZE}, got {ring_size}")
    return ring_size


def key_index(epoch: int, ring_size: int = DEFAULT_RING_SIZE) -> int:
    """The LiveKit key slot of an epoch. The SDK does not wrap indices itself."""
    if epoch < 0:
        raise ValueError("epoch must be >= 0")
    return epoch % check_ring_size(ring_size)


def sender_key_material(exporter: Exporter, identity: str) -> bytes:
    """Key material of ``identity`` for the exporter's epoch."""
    if not identity:
        raise ValueError("identity must not be empty")
    return exporter(EXPORTER_LABEL, identity.encode("utf-8"), MATERIAL_LENGTH)


def livekit_frame_key(material: bytes, ratchet_salt: bytes = LIVEKIT_RATCHET_SALT) -> bytes:
    """The AES-128-GCM key LiveKit's frame cryptor derives from ``material`` with HKDF."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=16, salt=ratchet_salt, info=bytes(128))
    return hkdf.derive(material)


def verification_code(epoch_authenticator: bytes) -> str:
    """A code people in a call can compare: 30 digits in 6 groups of 5.

    Group ``i`` is bytes ``[5i, 5i+5)`` of the epoch authenticator read as a big-endian
    integer, mod 100000, zero-padded (the construction DAVE uses for its codes).
    """
    needed = VERIFICATION_GROUPS * 5
    if len(epoch_authenticator) < needed:
        raise ValueError(f"epoch authenticator must have at least {needed} bytes")
    groups = (
        int.from_bytes(epoch_authenticator[5 * i : 5 * i + 5], "big")
        % 10**VERIFICATION_GROUP_DIGITS
        for i in range(VERIFICATION_GROUPS)
    )
    return " ".join(f"{g:0{VERIFICATION_GROUP_DIGITS}d}" for g in groups)


@dataclass(frozen=True)
class EpochKeys:
    """Every participant's key material for one epoch."""

    epoch: int
    key_index: int
    material: Mapping[str, bytes]

    def __repr__(self) -> str:  # never print key material
        members = len(self.material)
        return f"EpochKeys(epoch={self.epoch}, key_index={self.key_index}, members={members})"


@dataclass(frozen=True)
class KeySchedule:
    """The room's key schedule parameters (the delivery service hands out ``ring_size``)."""

    ring_size: int = DEFAULT_RING_SIZE

    def __post_init__(self) -> None:
        check_ring_size(self.ring_size)

    def key_index(self, epoch: int) -> int:
        return key_index(epoch, self.ring_size)

    def epoch_keys(self, exporter: Exporter, epoch: int, identities: Iterable[str]) -> EpochKeys:
        """Key material for each identity at ``epoch`` (the exporter must be that epoch's)."""
        material = {identity: sender_key_material(exporter, identity) for identity in identities}
        return EpochKeys(epoch=epoch, key_index=self.key_index(epoch), material=material)
