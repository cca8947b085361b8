"""The app's identity authority: who may hold the room's media keys is the app's decision.

Whoever holds the LiveKit API secret (the LiveKit operator: for most apps a hosted
LiveKit) can mint a token for any identity. So tokens alone must not make a member: in
*authority mode* every member's MLS credential is an **authority credential** — the
identity, the room and a validity period, signed (Ed25519) by a key only the app's backend
holds, over the member's MLS signature public key. Members pin the authority's public key
and refuse any credential it did not sign, wherever it appears (docs/protocol.md §1,
"Credentials"; docs/security.md).

The backend issues a credential next to where it mints LiveKit tokens::

    authority = IdentityAuthority.load("authority.key")       # the app's secret
    credential = authority.issue(identity, room, signature_public_key)

and the client asks for it with its signature public key (``SessionConfig.get_credential``).
``livekit-mls-authority create authority.key`` makes a key and prints its public half.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mls_provider import mls

__all__ = ["DEFAULT_VALIDITY", "IdentityAuthority", "main"]

DEFAULT_VALIDITY = timedelta(hours=12)
# issued a little in the past, so that a member whose clock is behind accepts it at once
BACKDATE = 60


class IdentityAuthority:
    """An Ed25519 signing key that vouches for members. Keep it with the app's secrets,
    never with LiveKit's or the delivery service's."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key

    @classmethod
    def generate(cls) -> IdentityAuthority:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> IdentityAuthority:
        """From the 32-byte Ed25519 seed (RFC 8032 secret key)."""
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> IdentityAuthority:
        """From a file holding the seed in hex (what :meth:`save` writes)."""
        return cls.from_seed(bytes.fromhex(Path(path).read_text().strip()))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the seed in hex to a new file readable by its owner only."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.seed.hex() + "\n")

    @property
    def seed(self) -> bytes:
        """The secret: only for saving it. Never log it."""
        return self._key.private_bytes_raw()

    @property
    def public_key(self) -> bytes:
        """The 32-byte public key members pin (``SessionConfig.authority_keys``) and the
        DS checks with (``--authority-key``)."""
        return self._key.public_key().public_bytes_raw()

    def issue(
        self,
        identity: str,
        room: str,
        signature_key: bytes,
        *,
        valid_for: timedelta = DEFAULT_VALIDITY,
        not_before: int | None = None,
    ) -> bytes:
        """A credential (the body ``MlsClient(credential=...)`` takes) vouching that
        ``identity`` in ``room`` holds the MLS signature key ``signature_key``, valid for
        ``valid_for`` from ``not_before`` (default: now, backdated a minute for clocks
        that are behind)."""
        now = int(time.time())
        start = now - BACKDATE if not_before is None else not_before
        end = (now if not_before is None else not_before) + int(valid_for.total_seconds())
        signed = mls.credential_signed_bytes(signature_key, identity, room, start, end)
        return mls.encode_credential(identity, room, start, end, self._key.sign(signed))

    def __repr__(self) -> str:
        return f"IdentityAuthority(public_key={self.public_key.hex()})"


def main(argv: Sequence[str] | None = None) -> None:
    """``livekit-mls-authority``: create an identity authority key, show its public key."""
    parser = argparse.ArgumentParser(
        prog="livekit-mls-authority",
        description="The app's identity authority for livekit-mls: create its key (kept "
        "with the app's backend) and print the public key that members pin and the "
        "delivery service checks (--authority-key).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="create a new key file (mode 0600)")
    create.add_argument("path")
    show = commands.add_parser("public-key", help="print the public key of a key file")
    show.add_argument("path")
    args = parser.parse_args(argv)
    try:
        if args.command == "create":
            authority = IdentityAuthority.generate()
            authority.save(args.path)
        else:
            authority = IdentityAuthority.load(args.path)
    except FileExistsError:
        sys.exit(f"error: {args.path} exists; not overwriting an authority key")
    except (OSError, ValueError) as e:
        sys.exit(f"error: cannot use {args.path}: {e}")
    print(authority.public_key.hex())


if __name__ == "__main__":
    main()
