"""Regenerate docs/vectors/key-schedule.json from mls_provider.keys.

The vectors cover the part of the key schedule computable without MLS: exporter output
(key material) -> key index and LiveKit's AES-128 frame key; epoch authenticator ->
verification code. tests/test_keys.py checks the module, the JSON and docs/protocol.md agree.
"""

import hashlib
import json
from pathlib import Path

from mls_provider import keys

OUT = Path(__file__).resolve().parent.parent / "docs" / "vectors" / "key-schedule.json"


def material(seed: str) -> bytes:
    return hashlib.sha256(seed.encode()).digest()


def main() -> None:
    cases = [
        ("alice", 0, 16),
        ("bob", 1, 16),
        ("alice", 17, 16),
        ("carol-ü", 255, 256),
        ("d", 300, 16),
    ]
    senders = []
    for identity, epoch, ring in cases:
        m = material(f"exporter output for {identity} at epoch {epoch}")
        senders.append(
            {
                "identity": identity,
                "epoch": epoch,
                "ring_size": ring,
                "exporter_context_hex": identity.encode().hex(),
                "material_hex": m.hex(),
                "key_index": keys.key_index(epoch, ring),
                "frame_key_hex": keys.livekit_frame_key(m).hex(),
            }
        )
    codes = []
    for seed in ("epoch authenticator 1", "epoch authenticator 2"):
        auth = hashlib.sha256(seed.encode()).digest()
        codes.append({"epoch_authenticator_hex": auth.hex(), "code": keys.verification_code(auth)})
    doc = {
        "exporter_label": keys.EXPORTER_LABEL.decode(),
        "exporter_length": keys.MATERIAL_LENGTH,
        "ratchet_salt": keys.LIVEKIT_RATCHET_SALT.decode(),
        "hkdf_info_hex": bytes(128).hex(),
        "sender_keys": senders,
        "verification_codes": codes,
    }
    OUT.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
