"""Bytes on the wire per key rotation: MLS through the delivery service vs pairwise
key distribution (each sender sends its new key to every other member, as MatrixRTC does).

MLS sizes are measured: real messages from the engine for a group of N (the room the
delivery service relays: the DS's proposal and the commit reach every member, the
Welcome reaches the joiner). Both directions of the DS are counted: uploads to the DS and
deliveries from it. Event framing (protobuf RoomEvent, gRPC/HTTP2) adds a few dozen bytes
per delivery and is left out on both sides.

Pairwise sizes are a *lower bound*: each key message is the smallest secure public-key
encryption of a 32-byte key (X25519 ephemeral key 32 B + AES-GCM ciphertext 32 B + tag
16 B + nonce 12 B) plus the two identities — built and measured here with
``cryptography``. Real pairwise schemes (Olm to-device JSON messages in MatrixRTC) are
several times larger.

    .venv/bin/python benchmarks/bench_wire.py [--sizes 10,100,1000]
"""

from __future__ import annotations

import argparse
import os

from common import markdown_table, write_result
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from mls_provider import mls

IDENTITY_BYTES = 8  # "member42": the identities used for both schemes


def client(name: str) -> mls.MlsClient:
    return mls.MlsClient(name, mls.SignatureKeyPair.generate())


def mls_sizes(members: int) -> dict[str, int]:
    """Message sizes for one join and one leave in a group of ``members`` built by one bulk
    Add: its parent nodes are blank, so an UpdatePath encrypts to many leaves — the large
    end of commit sizes (a tree whose members all committed once is ~log2(N) nodes)."""
    ds = mls.ExternalObserver("livekit-mls-ds", mls.SignatureKeyPair.generate())
    clients = [client(f"m{i:07d}") for i in range(members)]  # 8-byte identities
    group = clients[0].create_group(b"wire", [ds.signing_identity()])
    group.commit(add=[c.generate_key_package() for c in clients[1:]])
    group.apply_pending_commit()
    observed = ds.observe(group.group_info())

    joiner = client("joiner00")
    key_package = joiner.generate_key_package()
    add_proposal, _ = observed.propose_add(key_package)
    group.process_message(add_proposal)
    join = group.commit()
    observed.process_message(join.commit)
    group.apply_pending_commit()

    remove_proposal, _ = observed.propose_remove(members)  # the joiner's leaf
    group.process_message(remove_proposal)
    leave = group.commit()
    assert join.welcome is not None and join.group_info is not None
    assert leave.group_info is not None
    return {
        "key_package": len(key_package),
        "add_proposal": len(add_proposal),
        "join_commit": len(join.commit),
        "welcome": len(join.welcome),
        "join_group_info": len(join.group_info),
        "remove_proposal": len(remove_proposal),
        "leave_commit": len(leave.commit),
        "leave_group_info": len(leave.group_info),
    }


def pairwise_message_size() -> int:
    """One pairwise key message: ephemeral X25519 public key + nonce + AES-GCM(32-byte key)
    + sender and recipient identities."""
    recipient = X25519PrivateKey.generate().public_key()
    ephemeral = X25519PrivateKey.generate()
    shared = ephemeral.exchange(recipient)
    nonce = os.urandom(12)
    ciphertext = AESGCM(shared[:16]).encrypt(nonce, os.urandom(32), None)
    enc = ephemeral.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return len(enc) + len(nonce) + len(ciphertext) + 2 * IDENTITY_BYTES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,1000")
    args = parser.parse_args()
    pairwise = pairwise_message_size()
    rows, results = [], []
    for n in [int(s) for s in args.sizes.split(",")]:
        sizes = mls_sizes(n)
        # a leave among n+1 -> n remain: the DS receives the commit (+GroupInfo) once and
        # delivers the proposal and the commit to each of the n remaining members
        mls_leave = (
            sizes["leave_commit"]
            + sizes["leave_group_info"]
            + n * (sizes["remove_proposal"] + sizes["leave_commit"])
        )
        # a join into n -> n+1: key package up; proposal and commit to the n members,
        # Welcome to the joiner; the committer uploads commit, Welcome and GroupInfo
        mls_join = (
            sizes["key_package"]
            + sizes["join_commit"]
            + sizes["welcome"]
            + sizes["join_group_info"]
            + n * (sizes["add_proposal"] + sizes["join_commit"])
            + sizes["welcome"]
        )
        # pairwise: after a leave, each of the n remaining senders sends its new key to the
        # n-1 others (through a relay: counted once up and once down, like the DS)
        pairwise_leave = 2 * n * (n - 1) * pairwise
        pairwise_join = 2 * (n + 1) * n * pairwise
        rows.append([
            n, f"{sizes['leave_commit']:,}", f"{mls_leave:,}", f"{pairwise_leave:,}",
            f"{pairwise_leave / mls_leave:.1f}x", f"{mls_join:,}", f"{pairwise_join:,}",
            f"{pairwise_join / mls_join:.1f}x",
        ])  # fmt: skip
        results.append(
            {"members": n, "message_bytes": sizes, "pairwise_message_bytes": pairwise,
             "mls_leave_bytes": mls_leave, "pairwise_leave_bytes": pairwise_leave,
             "mls_join_bytes": mls_join, "pairwise_join_bytes": pairwise_join}
        )  # fmt: skip
    print(
        markdown_table(
            [
                "members",
                "MLS commit (B)",
                "MLS bytes per leave",
                "pairwise bytes per leave",
                "pairwise / MLS",
                "MLS bytes per join",
                "pairwise bytes per join",
                "pairwise / MLS",
            ],
            rows,
        )
    )
    print(f"\npairwise key message (lower bound): {pairwise} bytes")
    print(f"wrote {write_result('wire', {'results': results})}")


if __name__ == "__main__":
    main()
