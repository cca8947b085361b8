"""docs/protocol.md states the code's constants byte-exactly: this test holds it to that."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path

import pytest

from delivery_service.limits import KIB, MIB, Limits
from delivery_service.model import group_id_for
from delivery_service.ordering import OrderingConfig
from delivery_service.settings import DS_IDENTITY
from mls_provider import keys

PROTOCOL = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()


def table_rows(header_start: str) -> list[list[str]]:
    """The rows of the markdown table whose header line starts with ``header_start``."""
    lines = PROTOCOL.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip().strip("`") for cell in line.strip("|").split("|")])
    return rows


def test_group_id_vectors() -> None:
    rows = table_rows("| room | generation | group id")
    assert len(rows) == 3
    for room, generation, expected in rows:
        assert group_id_for(room, int(generation)).hex() == expected


def test_exporter_label_bytes() -> None:
    match = re.search(r"The label is the 25 ASCII bytes `([0-9a-f ]+)`", PROTOCOL)
    assert match is not None
    assert bytes.fromhex(match.group(1)) == keys.EXPORTER_LABEL
    assert len(keys.EXPORTER_LABEL) == 25
    assert f'label = "{keys.EXPORTER_LABEL.decode()}"' in PROTOCOL


def test_ds_identity_and_defaults() -> None:
    assert f'BasicCredential("{DS_IDENTITY}")' in PROTOCOL
    defaults = OrderingConfig()
    rows = {row[0]: row[1] for row in table_rows("| option | default | meaning")}
    assert rows["--commit-timeout"] == f"{defaults.commit_timeout} s"
    assert rows["--execute-timeout"] == f"{defaults.execute_timeout} s"
    assert rows["--create-timeout"] == f"{defaults.create_timeout} s"
    assert rows["--batch-quiet"] == f"{defaults.batch_quiet} s"
    assert rows["--burst-quiet"] == f"{defaults.burst_quiet} s"
    assert rows["--batch-max-wait"] == f"{defaults.batch_max_wait} s"
    assert f"(default {defaults.ring_size}, allowed 2..256)" in PROTOCOL


@pytest.mark.parametrize(
    ("field", "text"),
    [
        ("key_package", "key package {} KiB"),
        ("commit", "commit {} MiB"),
        ("welcome", "Welcome {} MiB"),
        ("group_info", "GroupInfo {} MiB"),
    ],
)
def test_size_limits(field: str, text: str) -> None:
    value = getattr(Limits(), field)
    unit = KIB if "KiB" in text else MIB
    assert text.format(value // unit) in PROTOCOL
    limits = Limits()
    assert f"rate limit ({limits.rate_per_second:g} req/s, burst {limits.burst}" in PROTOCOL


VECTORS = Path(__file__).resolve().parent.parent / "docs" / "vectors"


def test_authority_credential_vectors() -> None:
    """Every vector: the signed bytes, the Ed25519 signature (deterministic) from the
    authority's seed, the credential body and its MLS encoding; the table in the document
    is the first vector."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from mls_provider import mls
    from mls_provider.authority import IdentityAuthority

    vectors = json.loads((VECTORS / "authority-credential.json").read_text())
    for v in vectors:
        authority = IdentityAuthority.from_seed(bytes.fromhex(v["authority_seed"]))
        assert authority.public_key.hex() == v["authority_public_key"]
        signed = mls.credential_signed_bytes(
            bytes.fromhex(v["signature_key"]), v["identity"], v["room"],
            v["not_before"], v["not_after"],
        )  # fmt: skip
        assert signed.hex() == v["signed_bytes"]
        key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(v["authority_seed"]))
        assert key.sign(signed).hex() == v["signature"]
        data = authority.issue(
            v["identity"], v["room"], bytes.fromhex(v["signature_key"]),
            not_before=v["not_before"],
            valid_for=timedelta(seconds=v["not_after"] - v["not_before"]),
        )  # fmt: skip
        assert data.hex() == v["credential_data"]
        # Credential: uint16 type, then data<V> (a two-byte varint here: 0x4000 | length)
        encoded = mls.AUTHORITY_CREDENTIAL_TYPE.to_bytes(2, "big")
        encoded += (0x4000 | len(data)).to_bytes(2, "big") + data
        assert encoded.hex() == v["credential"]
    rows = dict(
        (cell[0], cell[1]) for cell in table_rows("| field | value")
    )  # the document's table
    first = vectors[0]
    assert rows["signed bytes"] == first["signed_bytes"]
    assert rows["signature"] == first["signature"]
    assert rows["Credential"] == first["credential"]
    assert f'"{"livekit-mls v1 credential"}"' in PROTOCOL


def test_refused_authority_credential_vectors() -> None:
    """Each refused body is refused: by decoding, or by the authority's check."""
    from mls_provider import mls

    good = json.loads((VECTORS / "authority-credential.json").read_text())[0]
    for v in json.loads((VECTORS / "authority-credential-refused.json").read_text()):
        data = bytes.fromhex(v["credential_data"])
        try:
            decoded = mls.decode_credential(data)
        except mls.MlsError:
            continue
        # decodes, but the signature no longer matches what was signed
        signed = mls.credential_signed_bytes(
            bytes.fromhex(good["signature_key"]), decoded.identity, decoded.room,
            decoded.not_before, decoded.not_after,
        )  # fmt: skip
        assert signed.hex() != good["signed_bytes"], v["case"]
