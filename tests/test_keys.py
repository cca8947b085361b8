"""The key schedule: module, published vectors and docs/protocol.md agree, and the
schedule matches what the MLS engine exports."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

import pytest

from mls_provider import keys, mls

ROOT = Path(__file__).resolve().parent.parent
VECTORS = json.loads((ROOT / "docs" / "vectors" / "key-schedule.json").read_text())
PROTOCOL = (ROOT / "docs" / "protocol.md").read_text()


def hkdf_sha256_reference(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 written out with the standard library, to check the `cryptography` call."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    okm, block = b"", b""
    for counter in range(1, -(-length // 32) + 1):
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
    return okm[:length]


def test_constants_match_vectors() -> None:
    assert VECTORS["exporter_label"].encode() == keys.EXPORTER_LABEL
    assert VECTORS["exporter_length"] == keys.MATERIAL_LENGTH
    assert VECTORS["ratchet_salt"].encode() == keys.LIVEKIT_RATCHET_SALT
    assert bytes.fromhex(VECTORS["hkdf_info_hex"]) == bytes(128)


@pytest.mark.parametrize(
    "case", VECTORS["sender_keys"], ids=lambda c: f"{c['identity']}@{c['epoch']}"
)
def test_sender_key_vectors(case: dict[str, object]) -> None:
    material = bytes.fromhex(str(case["material_hex"]))
    epoch, ring = int(str(case["epoch"])), int(str(case["ring_size"]))
    assert keys.key_index(epoch, ring) == case["key_index"]
    frame_key = keys.livekit_frame_key(material)
    assert frame_key.hex() == case["frame_key_hex"]
    assert frame_key == hkdf_sha256_reference(material, b"LKFrameEncryptionKey", bytes(128), 16)
    assert str(case["identity"]).encode().hex() == case["exporter_context_hex"]
    # the published document carries the same bytes
    for field in ("material_hex", "frame_key_hex"):
        assert str(case[field]) in PROTOCOL, f"{field} of {case['identity']} missing in protocol.md"


@pytest.mark.parametrize("case", VECTORS["verification_codes"])
def test_verification_code_vectors(case: dict[str, str]) -> None:
    code = keys.verification_code(bytes.fromhex(case["epoch_authenticator_hex"]))
    assert code == case["code"]
    assert len(code.replace(" ", "")) == 30 and code.count(" ") == 5
    assert case["code"] in PROTOCOL


def test_schedule_uses_the_engine_exporter_with_the_documented_label() -> None:
    alice = mls.MlsClient("alice", mls.SignatureKeyPair.generate())
    bob = mls.MlsClient("bob", mls.SignatureKeyPair.generate())
    group = alice.create_group(b"g")
    welcome = group.commit(add=[bob.generate_key_package()]).welcome
    group.apply_pending_commit()
    assert welcome is not None
    joined = bob.join_group(welcome)
    schedule = keys.KeySchedule(ring_size=16)
    ours = schedule.epoch_keys(group.export_secret, group.epoch, ["alice", "bob"])
    theirs = schedule.epoch_keys(joined.export_secret, joined.epoch, ["alice", "bob"])
    assert ours == theirs and ours.key_index == 1
    assert ours.material["alice"] == group.export_secret(b"livekit-mls v1 sender key", b"alice", 32)
    assert ours.material["alice"] != ours.material["bob"]
    assert "material" not in repr(ours) or ours.material["alice"].hex() not in repr(ours)


def test_bad_parameters() -> None:
    with pytest.raises(ValueError):
        keys.KeySchedule(ring_size=1)
    with pytest.raises(ValueError):
        keys.KeySchedule(ring_size=257)
    with pytest.raises(ValueError):
        keys.key_index(-1)
    with pytest.raises(ValueError):
        keys.verification_code(b"short")
    with pytest.raises(ValueError):
        keys.sender_key_material(lambda label, ctx, n: b"", "")
