//! Credentials: who a leaf belongs to, and who vouches for it.
//!
//! Two credential types are accepted for members:
//!
//! * `BasicCredential` (RFC 9420 §5.3): the UTF-8 LiveKit identity, vouched for by nobody
//!   but the LiveKit token the delivery service checked. Open mode only.
//! * The **authority credential** (custom type `0xF1D1`, in RFC 9420's private-use range):
//!   the identity, the LiveKit room and a validity period, signed with Ed25519 by the app's
//!   own identity authority over those fields *and* the leaf's MLS signature public key.
//!   Members that pin the authority's public key accept nothing else.
//!
//! Wire format (docs/protocol.md §1, "Credentials"; `<V>` is RFC 9420's variable-length
//! vector prefix):
//!
//! ```text
//! AuthorityCredential { opaque identity<V>; opaque room<V>; uint64 not_before;
//!                       uint64 not_after; opaque signature<V>; }
//! signature = Ed25519(authority, "livekit-mls v1 credential" || 0x00 ||
//!     CredentialTBS { opaque signature_key<V>; opaque identity<V>; opaque room<V>;
//!                     uint64 not_before; uint64 not_after; })
//! ```

use std::time::{SystemTime, UNIX_EPOCH};

use mls_rs::crypto::SignaturePublicKey;
use mls_rs::identity::{Credential, CredentialType, CustomCredential, SigningIdentity};
use mls_rs::mls_rs_codec::{MlsDecode, MlsEncode};
use mls_rs::CipherSuiteProvider;

use crate::client::suite_provider;
use crate::config::check_identity;
use crate::error::{Error, ErrorKind, Result};

/// The authority credential's type (RFC 9420 §17.1 private use: 0xF000..=0xFFFF).
pub const AUTHORITY_CREDENTIAL_TYPE: u16 = 0xF1D1;
/// Domain separation of the authority's signatures.
pub const CREDENTIAL_LABEL: &[u8] = b"livekit-mls v1 credential";
/// Seconds of clock difference tolerated on both ends of a validity period.
pub const CLOCK_SKEW: u64 = 300;
/// Length of an Ed25519 public key and of a signature.
const ED25519_PUBLIC_KEY_LEN: usize = 32;
const ED25519_SIGNATURE_LEN: usize = 64;

/// The authority's statement about one member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthorityCredential {
    pub identity: String,
    pub room: String,
    pub not_before: u64,
    pub not_after: u64,
    pub signature: Vec<u8>,
}

fn put_vec(out: &mut Vec<u8>, bytes: &[u8]) -> Result<()> {
    bytes.to_vec().mls_encode(out)?;
    Ok(())
}

fn take_vec(reader: &mut &[u8]) -> Result<Vec<u8>> {
    Ok(Vec::<u8>::mls_decode(reader)?)
}

fn take_text(reader: &mut &[u8], field: &str) -> Result<String> {
    let bytes = take_vec(reader)?;
    if field == "room" {
        // a room name obeys the same rules as an identity: 1..=1024 bytes of UTF-8
        return check_identity(&bytes)
            .map(str::to_owned)
            .map_err(|e| Error::validation("InvalidCredential", format!("room: {}", e.message)));
    }
    Ok(check_identity(&bytes)?.to_owned())
}

impl AuthorityCredential {
    /// Strict decoding of a credential body: no trailing bytes, identity and room of 1..=1024
    /// bytes of UTF-8, `not_before < not_after`, a 64-byte signature.
    pub fn decode(data: &[u8]) -> Result<Self> {
        let mut reader = data;
        let identity = take_text(&mut reader, "identity")?;
        let room = take_text(&mut reader, "room")?;
        let not_before = u64::mls_decode(&mut reader)?;
        let not_after = u64::mls_decode(&mut reader)?;
        let signature = take_vec(&mut reader)?;
        if !reader.is_empty() {
            return Err(Error::decode(
                "trailing bytes after the authority credential",
            ));
        }
        if not_before >= not_after {
            return Err(Error::validation(
                "InvalidCredential",
                "credential not_before must be earlier than not_after",
            ));
        }
        if signature.len() != ED25519_SIGNATURE_LEN {
            return Err(Error::validation(
                "InvalidCredential",
                "credential signature must be 64 bytes (Ed25519)",
            ));
        }
        Ok(Self {
            identity,
            room,
            not_before,
            not_after,
            signature,
        })
    }

    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        put_vec(&mut out, self.identity.as_bytes())?;
        put_vec(&mut out, self.room.as_bytes())?;
        self.not_before.mls_encode(&mut out)?;
        self.not_after.mls_encode(&mut out)?;
        put_vec(&mut out, &self.signature)?;
        Ok(out)
    }

    /// The MLS credential carrying it.
    pub fn to_credential(&self) -> Result<Credential> {
        Ok(Credential::Custom(CustomCredential::new(
            CredentialType::new(AUTHORITY_CREDENTIAL_TYPE),
            self.encode()?,
        )))
    }
}

/// The exact bytes the authority signs for a member's credential.
pub fn signed_bytes(
    signature_key: &[u8],
    identity: &str,
    room: &str,
    not_before: u64,
    not_after: u64,
) -> Result<Vec<u8>> {
    check_identity(identity.as_bytes())?;
    check_identity(room.as_bytes())?;
    let mut out = Vec::with_capacity(CREDENTIAL_LABEL.len() + 64 + identity.len() + room.len());
    out.extend_from_slice(CREDENTIAL_LABEL);
    out.push(0);
    put_vec(&mut out, signature_key)?;
    put_vec(&mut out, identity.as_bytes())?;
    put_vec(&mut out, room.as_bytes())?;
    not_before.mls_encode(&mut out)?;
    not_after.mls_encode(&mut out)?;
    Ok(out)
}

pub fn now_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn rejected(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Validation, "CredentialRejected", message)
}

/// The identity authorities a party trusts, and (for a member) the room it is in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authority {
    public_keys: Vec<Vec<u8>>,
    room: Option<String>,
}

impl Authority {
    /// `public_keys`: the authority's Ed25519 public keys (several during a rotation);
    /// `room`: credentials must name this room (members); None checks no room (the
    /// delivery service, which checks the room against the caller's token itself).
    pub fn new(public_keys: Vec<Vec<u8>>, room: Option<String>) -> Result<Self> {
        if public_keys.is_empty() {
            return Err(Error::invalid_argument(
                "an authority needs at least one public key",
            ));
        }
        if public_keys
            .iter()
            .any(|k| k.len() != ED25519_PUBLIC_KEY_LEN)
        {
            return Err(Error::invalid_argument(
                "authority public keys are 32-byte Ed25519 keys",
            ));
        }
        if let Some(room) = &room {
            check_identity(room.as_bytes())?;
        }
        Ok(Self { public_keys, room })
    }

    pub fn public_keys(&self) -> &[Vec<u8>] {
        &self.public_keys
    }

    /// The full check of a leaf's credential at `now` (Unix seconds): an authority
    /// credential for our room, signed by one of our authorities over this very signature
    /// key, valid at `now` give or take [`CLOCK_SKEW`].
    pub fn verify(
        &self,
        signing_identity: &SigningIdentity,
        now: u64,
    ) -> Result<AuthorityCredential> {
        let credential = authority_credential(&signing_identity.credential)?
            .ok_or_else(|| rejected("not vouched for: the credential is not the authority's"))?;
        if let Some(room) = &self.room {
            if &credential.room != room {
                return Err(rejected(format!(
                    "credential of {:?} is for room {:?}, not {:?}",
                    credential.identity, credential.room, room
                )));
            }
        }
        let message = signed_bytes(
            signing_identity.signature_key.as_bytes(),
            &credential.identity,
            &credential.room,
            credential.not_before,
            credential.not_after,
        )?;
        let provider = suite_provider(crate::config::DEFAULT_CIPHER_SUITE)?;
        let vouched = self.public_keys.iter().any(|key| {
            provider
                .verify(
                    &SignaturePublicKey::from(key.clone()),
                    &credential.signature,
                    &message,
                )
                .is_ok()
        });
        if !vouched {
            return Err(rejected(format!(
                "credential of {:?} is not signed by a pinned authority for this signature key",
                credential.identity
            )));
        }
        if now.saturating_add(CLOCK_SKEW) < credential.not_before {
            return Err(rejected(format!(
                "credential of {:?} is not valid before {} (now {now})",
                credential.identity, credential.not_before
            )));
        }
        if now > credential.not_after.saturating_add(CLOCK_SKEW) {
            return Err(rejected(format!(
                "credential of {:?} expired at {} (now {now})",
                credential.identity, credential.not_after
            )));
        }
        Ok(credential)
    }
}

/// The authority credential a credential carries: None for a basic credential, an error
/// for any other type or a malformed body.
pub fn authority_credential(credential: &Credential) -> Result<Option<AuthorityCredential>> {
    match credential {
        Credential::Basic(_) => Ok(None),
        Credential::Custom(custom)
            if custom.credential_type.raw_value() == AUTHORITY_CREDENTIAL_TYPE =>
        {
            AuthorityCredential::decode(&custom.data).map(Some)
        }
        other => Err(Error::validation(
            "UnsupportedCredential",
            format!(
                "credential type {:#06x} is not accepted",
                other.credential_type().raw_value()
            ),
        )),
    }
}
