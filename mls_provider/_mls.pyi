"""Type stubs of the native MLS engine (Rust, mls-rs, PyO3). Import it as ``mls_provider.mls``.

Every call that fails raises an :class:`MlsError` subclass (or ``ValueError`` for an
argument out of range) and leaves the object unchanged. Heavy calls release the GIL.
"""

from collections.abc import Sequence
from typing import Final, final

DEFAULT_CIPHER_SUITE: Final[int]
SUPPORTED_CIPHER_SUITES: Final[list[int]]
MAX_EXPORT_LENGTH: Final[int]

class MlsError(Exception):
    """Base class of every MLS failure. ``code`` names the mls-rs failure."""

    code: str

class DecodeError(MlsError):
    """The bytes are not a well-formed MLS structure of the expected type."""

class EpochError(MlsError):
    """A message for an epoch other than the group's current one."""

class ValidationError(MlsError):
    """A well-formed message that fails MLS validation (signature, tree, proposals, ...)."""

class StateError(MlsError):
    """The call does not fit the object's state (no pending commit, removed, ...)."""

class UnsupportedError(MlsError):
    """A cipher suite or protocol version this build does not support."""

class InternalError(MlsError):
    """A failure inside the engine that is not the caller's fault."""

@final
class SignatureKeyPair:
    """A signature key pair for one cipher suite (Ed25519 for suite 1)."""

    @staticmethod
    def generate(cipher_suite: int = 1) -> SignatureKeyPair: ...
    @staticmethod
    def from_secret(secret_key: bytes, cipher_suite: int = 1) -> SignatureKeyPair:
        """Rebuild from the secret half; the public half is derived."""
    @property
    def cipher_suite(self) -> int: ...
    @property
    def public_key(self) -> bytes: ...
    @property
    def secret_key(self) -> bytes:
        """The secret half, only for persisting the key. Never log it."""

@final
class Member:
    leaf_index: int
    identity: str
    signature_key: bytes
    not_after: int | None
    """When its authority credential expires (Unix seconds); None: a basic credential."""

@final
class CommitOutput:
    commit: bytes
    """The Commit (PublicMessage) to submit."""
    welcome: bytes | None
    """The Welcome for the members the commit adds."""
    group_info: bytes | None
    """The new epoch's GroupInfo (with ratchet tree, allows external commits)."""
    left_out: list[str]
    """Proposals the commit left out because our rules refused them (an Add whose
    credential is not vouched for: the identity it would have added)."""

@final
class ProposalReceived:
    """A proposal was validated and cached; the next commit includes it by reference."""

    proposal_type: str
    """"add", "remove", "update", "psk", "reinit", "external_init",
    "group_context_extensions" or "custom"."""
    sender_kind: str
    """"member", "external" (an external sender such as the delivery service) or
    "new_member"."""
    sender_index: int | None
    target_identity: str | None
    target_leaf_index: int | None
    proposal_ref: bytes

@final
class CommitApplied:
    """A commit was validated and applied; the group is at ``epoch`` now."""

    epoch: int
    committer: int
    is_external: bool
    added: list[Member]
    """Members that joined, with their leaf index in the new epoch."""
    removed: list[Member]
    """Members that left, with the leaf index they had."""
    self_removed: bool
    """True when this commit removed the local member; the group is then unusable."""
    proposal_refs: list[bytes]
    """References of the by-reference proposals the commit applied."""
    by_value_proposals: list[str]
    has_path: bool
    """Whether the commit carried an UpdatePath (livekit-mls requires one)."""

@final
class OtherMessage:
    """A message that changes nothing in this state (application data, Welcome, ...)."""

    kind: str

@final
class MessageInfo:
    wire_format: str
    """"public_message", "private_message", "welcome", "group_info" or "key_package"."""
    content_type: str | None
    """"proposal", "commit" or "application" for protocol messages."""
    group_id: bytes | None
    epoch: int | None
    sender_kind: str | None
    sender_index: int | None
    cipher_suite: int | None
    welcome_recipients: list[bytes]
    """For a Welcome: the KeyPackageRefs of its recipients (empty otherwise)."""
    key_package_ref: bytes | None
    """For a KeyPackage: its KeyPackageRef, the name a Welcome gives its recipient."""

@final
class KeyPackageInfo:
    identity: str
    cipher_suite: int
    signature_key: bytes
    reference: bytes
    """The KeyPackageRef a Welcome uses to name its recipient."""
    room: str | None
    """The room its authority credential names (None: a basic credential)."""
    not_after: int | None
    """When its authority credential expires (Unix seconds)."""

@final
class Authority:
    """The identity authorities a member (or the DS) trusts: every credential must be an
    authority credential signed by one of ``public_keys`` (32-byte Ed25519 keys) for the
    leaf's signature key, valid now (give or take 300 s), and, with ``room``, name it."""

    def __init__(self, public_keys: Sequence[bytes], room: str | None = None) -> None: ...
    @property
    def public_keys(self) -> list[bytes]: ...

@final
class AuthorityCredential:
    """A decoded authority credential (docs/protocol.md §1, "Credentials")."""

    identity: str
    room: str
    not_before: int
    not_after: int
    signature: bytes

AUTHORITY_CREDENTIAL_TYPE: int
"""0xF1D1: the authority credential's MLS credential type."""

def credential_signed_bytes(
    signature_key: bytes, identity: str, room: str, not_before: int, not_after: int
) -> bytes:
    """What an identity authority signs (Ed25519) to vouch for ``identity`` in ``room``
    holding ``signature_key`` from ``not_before`` to ``not_after`` (Unix seconds)."""

def encode_credential(
    identity: str, room: str, not_before: int, not_after: int, signature: bytes
) -> bytes:
    """The body of an authority credential (what ``MlsClient(credential=...)`` takes)."""

def decode_credential(data: bytes) -> AuthorityCredential:
    """Strictly decodes a credential body (its signature is not checked)."""

@final
class MlsClient:
    """One LiveKit participant identity: key packages; create, join and load groups."""

    def __init__(
        self,
        identity: str,
        key_pair: SignatureKeyPair,
        *,
        credential: bytes | None = None,
        authority: Authority | None = None,
        require_update_path: bool = True,
    ) -> None:
        """``credential``: the authority credential (body) the app's identity authority
        issued for ``key_pair``'s public key (None: a basic credential, open mode);
        ``authority``: the authorities this client trusts in its room (None: open mode).
        ``require_update_path=False`` makes add-only commits without an UpdatePath:
        RFC 9420 allows it, livekit-mls forbids it (the DS refuses them). For tests only."""
    @property
    def identity(self) -> str: ...
    @property
    def cipher_suite(self) -> int: ...
    @property
    def key_pair(self) -> SignatureKeyPair: ...
    def renewed(self, credential: bytes) -> MlsClient:
        """This client with a renewed authority credential (same signature key); key
        packages handed out before stay usable."""
    def signing_identity(self) -> bytes:
        """This client's SigningIdentity in MLS wire format."""
    def generate_key_package(self) -> bytes:
        """A fresh KeyPackage; its private keys stay in this client until a Welcome uses them."""
    def create_group(self, group_id: bytes, external_senders: Sequence[bytes] = ()) -> Group:
        """A one-member group at epoch 0 whose context allows ``external_senders``
        (encoded SigningIdentities) to send proposals."""
    def join_group(self, welcome: bytes) -> Group: ...
    def join_by_external_commit(
        self, group_info: bytes, replace_leaf: int | None = None
    ) -> tuple[Group, bytes]:
        """Join from a GroupInfo; with ``replace_leaf`` also remove this identity's stale
        leaf. Returns the group (already at the new epoch) and the commit to submit."""
    def load_group(self, state: bytes) -> Group:
        """Restore a group from :meth:`Group.to_bytes`."""

@final
class Group:
    """A member's MLS group. Thread-safe; calls on one group are serialized."""

    @property
    def group_id(self) -> bytes: ...
    @property
    def epoch(self) -> int: ...
    @property
    def cipher_suite(self) -> int: ...
    @property
    def own_leaf_index(self) -> int: ...
    @property
    def identity(self) -> str: ...
    @property
    def is_removed(self) -> bool: ...
    @property
    def has_pending_commit(self) -> bool: ...
    @property
    def pending_proposal_count(self) -> int: ...
    @property
    def member_count(self) -> int: ...
    def members(self) -> list[Member]: ...
    def member_index(self, identity: str) -> int | None: ...
    def member_at(self, leaf_index: int) -> Member | None: ...
    def external_senders(self) -> list[tuple[str, bytes]]:
        """(identity, signature key) of each external sender the group context allows."""
    def commit(
        self,
        add: Sequence[bytes] = (),
        remove: Sequence[int] = (),
        remove_identities: Sequence[str] = (),
    ) -> CommitOutput:
        """One commit adding key packages, removing leaves (by index or identity) and
        including every cached proposal. It stays pending until applied or discarded."""
    def commit_renewal(self, key_pair: SignatureKeyPair, credential: bytes) -> CommitOutput:
        """A commit of every cached proposal that also renews our credential: ``key_pair``
        becomes our signature key, ``credential`` the authority credential issued for it
        (same identity and room)."""
    def apply_pending_commit(self) -> CommitApplied: ...
    def discard_pending_commit(self) -> None: ...
    def process_message(self, message: bytes) -> ProposalReceived | CommitApplied | OtherMessage:
        """Validate and apply a proposal or commit (our own pending commit included)."""
    def export_secret(self, label: bytes, context: bytes, length: int) -> bytes:
        """MLS-Exporter(label, context, length) of the current epoch (RFC 9420 §8.5)."""
    def epoch_authenticator(self) -> bytes: ...
    def group_info(self, with_ratchet_tree: bool = True) -> bytes:
        """A signed GroupInfo of the current epoch allowing external commits."""
    def to_bytes(self) -> bytes:
        """The whole state INCLUDING SECRETS (signature key, epoch and exporter secrets).
        Store it encrypted."""

@final
class ExternalObserver:
    """The delivery service's MLS identity: validates public handshakes of groups it
    follows and signs external proposals. It never holds an epoch secret."""

    def __init__(
        self, identity: str, key_pair: SignatureKeyPair, *, authority: Authority | None = None
    ) -> None:
        """With an ``authority`` (no room: the DS checks each key package's room against
        its caller's token), every credential must be vouched for by it."""
    @property
    def identity(self) -> str: ...
    @property
    def public_key(self) -> bytes: ...
    def signing_identity(self) -> bytes:
        """The SigningIdentity to list as a group's external sender."""
    def observe(self, group_info: bytes) -> ObservedGroup:
        """Follow a group from a GroupInfo carrying its ratchet tree."""
    def load(self, snapshot: bytes) -> ObservedGroup: ...
    def validate_key_package(self, key_package: bytes) -> KeyPackageInfo: ...

@final
class ObservedGroup:
    """Public state of one group as the delivery service follows it."""

    @property
    def group_id(self) -> bytes: ...
    @property
    def epoch(self) -> int: ...
    @property
    def cipher_suite(self) -> int: ...
    def members(self) -> list[Member]: ...
    def member_index(self, identity: str) -> int | None: ...
    def member_at(self, leaf_index: int) -> Member | None: ...
    def external_senders(self) -> list[tuple[str, bytes]]:
        """(identity, signature key) of each external sender the group context allows."""
    def process_message(self, message: bytes) -> ProposalReceived | CommitApplied | OtherMessage:
        """Validate and apply a public proposal or commit; raises on anything invalid."""
    def propose_add(self, key_package: bytes) -> tuple[bytes, bytes]:
        """An external Add signed by the observer: (proposal message, proposal ref)."""
    def propose_remove(self, leaf_index: int) -> tuple[bytes, bytes]:
        """An external Remove signed by the observer: (proposal message, proposal ref)."""
    def pending_proposal_refs(self) -> list[bytes]: ...
    def clear_proposals(self) -> None: ...
    def snapshot(self) -> bytes:
        """Public state only (tree, context, cached proposals): no secrets."""
    def tree_hash(self) -> bytes: ...
    def describes(self, group_info: bytes) -> bool:
        """Whether ``group_info`` is of exactly the observed epoch (same GroupContext:
        group id, epoch, tree hash, transcript hash, extensions). No signature check."""
    def copy(self) -> ObservedGroup:
        """An independent copy, to try a commit and keep it only if accepted."""

def message_info(message: bytes) -> MessageInfo:
    """Routing facts of an MLS message, readable without group state."""
