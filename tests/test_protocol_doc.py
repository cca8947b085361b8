"""docs/protocol.md states the code's constants byte-exactly: this test holds it to that."""

from __future__ import annotations

import re
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
