"""The MLS engine: mls-rs (RFC 9420) compiled into ``mls_provider._mls``.

This module is the engine's public face; see ``_mls.pyi`` for the documented API.
Every failure raises an :class:`MlsError` subclass (``ValueError`` for an argument out of
range) and leaves the object it was called on unchanged.
"""

from typing import TypeAlias

from mls_provider._mls import (
    AUTHORITY_CREDENTIAL_TYPE,
    DEFAULT_CIPHER_SUITE,
    MAX_EXPORT_LENGTH,
    SUPPORTED_CIPHER_SUITES,
    Authority,
    AuthorityCredential,
    CommitApplied,
    CommitOutput,
    DecodeError,
    EpochError,
    ExternalObserver,
    Group,
    InternalError,
    KeyPackageInfo,
    Member,
    MessageInfo,
    MlsClient,
    MlsError,
    ObservedGroup,
    OtherMessage,
    ProposalReceived,
    SignatureKeyPair,
    StateError,
    UnsupportedError,
    ValidationError,
    credential_signed_bytes,
    decode_credential,
    encode_credential,
    message_info,
)

Received: TypeAlias = ProposalReceived | CommitApplied | OtherMessage
"""What processing a message did."""

__all__ = [
    "AUTHORITY_CREDENTIAL_TYPE",
    "DEFAULT_CIPHER_SUITE",
    "MAX_EXPORT_LENGTH",
    "SUPPORTED_CIPHER_SUITES",
    "Authority",
    "AuthorityCredential",
    "CommitApplied",
    "CommitOutput",
    "DecodeError",
    "EpochError",
    "ExternalObserver",
    "Group",
    "InternalError",
    "KeyPackageInfo",
    "Member",
    "MessageInfo",
    "MlsClient",
    "MlsError",
    "ObservedGroup",
    "OtherMessage",
    "ProposalReceived",
    "Received",
    "SignatureKeyPair",
    "StateError",
    "UnsupportedError",
    "ValidationError",
    "credential_signed_bytes",
    "decode_credential",
    "encode_credential",
    "message_info",
]
