//! The MLS engine of livekit-mls: a narrow facade over [mls-rs] that knows RFC 9420 and
//! nothing else (no LiveKit, no transport).
//!
//! * [`Client`] — one participant identity: key packages, create / join / load groups.
//! * [`Group`] — a member's group: commit, process, export secrets, serialize.
//! * [`Observer`] / [`ObservedGroup`] — the delivery service's view: validate public
//!   handshakes and issue external proposals, without any epoch secret.
//!
//! Every fallible call returns [`Error`] (never panics on input bytes) and leaves the
//! object unchanged on error.
//!
//! [mls-rs]: https://github.com/awslabs/mls-rs

pub mod client;
pub mod config;
pub mod credential;
pub mod error;
pub mod group;
pub mod observer;
pub mod types;

pub use client::{encode_signing_identity, Client, ClientOptions, SignatureKeyPair};
pub use credential::{Authority, AuthorityCredential, AUTHORITY_CREDENTIAL_TYPE};
pub use error::{Error, ErrorKind, Result};
pub use group::{CommitOutput, Group};
pub use observer::{KeyPackageInfo, ObservedGroup, Observer};
pub use types::{
    message_info, CommitApplied, Member, MessageInfo, ProposalReceived, Received, SenderKind,
};
