//! The one mls-rs configuration every party uses: members and the delivery service's
//! observer must run identical rules, because the rules filter proposals on receipt too.

use std::sync::Arc;

use mls_rs::client_builder::{self, PaddingMode};
use mls_rs::error::IntoAnyError;
use mls_rs::external_client::builder as external_builder;
use mls_rs::identity::basic::BasicCredential;
use mls_rs::identity::{CredentialType, SigningIdentity};
use mls_rs::mls_rules::{CommitOptions, DefaultMlsRules, EncryptionOptions};
use mls_rs::time::MlsTime;
use mls_rs::{CipherSuite, ExtensionList, IdentityProvider};
use mls_rs_core::identity::MemberValidationContext;
use mls_rs_crypto_rustcrypto::RustCryptoProvider;

use crate::credential::{authority_credential, now_seconds, Authority, AUTHORITY_CREDENTIAL_TYPE};
use crate::error::{Error, Result};

/// Longest identity accepted in a credential (LiveKit identities are short strings).
pub const MAX_IDENTITY_LEN: usize = 1024;

/// The default cipher suite: MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519.
pub const DEFAULT_CIPHER_SUITE: u16 = 1;

/// Cipher suites the pure-Rust crypto provider implements.
pub const SUPPORTED_CIPHER_SUITES: [u16; 4] = [1, 2, 3, 7];

/// Client configuration: in-memory storages (state leaves the engine only as an explicit
/// `Group::to_bytes` blob), UTF-8 basic credentials, the shared rules, RustCrypto.
pub type ClientConfig = client_builder::WithMlsRules<
    DefaultMlsRules,
    client_builder::WithIdentityProvider<
        LivekitIdentityProvider,
        client_builder::WithCryptoProvider<RustCryptoProvider, client_builder::BaseConfig>,
    >,
>;

/// Observer configuration for the delivery service (no secrets beyond its own signer).
pub type ObserverConfig = external_builder::WithMlsRules<
    DefaultMlsRules,
    external_builder::WithIdentityProvider<
        LivekitIdentityProvider,
        external_builder::WithCryptoProvider<
            RustCryptoProvider,
            external_builder::ExternalBaseConfig,
        >,
    >,
>;

/// Rules shared by every member and the observer.
///
/// * handshakes are PublicMessages, so the delivery service can validate them;
/// * every commit carries an UpdatePath, so each join and leave also refreshes the
///   committer's leaf (post-compromise security on every rotation);
/// * Welcomes carry the ratchet tree, so joiners need nothing out of band;
/// * commits produce a GroupInfo that allows external commits (re-join without a member).
pub fn mls_rules() -> DefaultMlsRules {
    mls_rules_with(true)
}

/// The shared rules, with `path_required` chosen (false only in tests of the DS's rule
/// that every commit carries an UpdatePath).
pub fn mls_rules_with(path_required: bool) -> DefaultMlsRules {
    DefaultMlsRules::new()
        .with_commit_options(
            CommitOptions::new()
                .with_path_required(path_required)
                .with_ratchet_tree_extension(true)
                .with_single_welcome_message(true)
                .with_allow_external_commit(true),
        )
        .with_encryption_options(EncryptionOptions::new(false, PaddingMode::None))
}

pub fn crypto_provider() -> RustCryptoProvider {
    RustCryptoProvider::new()
}

pub fn cipher_suite(value: u16) -> Result<CipherSuite> {
    if SUPPORTED_CIPHER_SUITES.contains(&value) {
        Ok(CipherSuite::from(value))
    } else {
        Err(Error::new(
            crate::error::ErrorKind::Unsupported,
            "UnsupportedCipherSuite",
            format!("cipher suite {value:#06x} is not supported (supported: 1, 2, 3, 7)"),
        ))
    }
}

/// Checks that an identity is usable as a LiveKit participant identity.
pub fn check_identity(identity: &[u8]) -> Result<&str> {
    if identity.is_empty() || identity.len() > MAX_IDENTITY_LEN {
        return Err(Error::validation(
            "InvalidIdentity",
            format!(
                "identity must be 1..={MAX_IDENTITY_LEN} bytes, got {}",
                identity.len()
            ),
        ));
    }
    std::str::from_utf8(identity)
        .map_err(|_| Error::validation("InvalidIdentity", "identity is not valid UTF-8"))
}

/// The identity of a signing identity, as text: the identifier of a basic credential or
/// the identity an authority credential names.
pub fn identity_of(signing_identity: &SigningIdentity) -> Result<String> {
    let credential = &signing_identity.credential;
    match authority_credential(credential)? {
        Some(vouched) => Ok(vouched.identity),
        None => {
            let basic = credential.as_basic().ok_or_else(|| {
                Error::validation("UnsupportedCredential", "unsupported credential")
            })?;
            Ok(check_identity(&basic.identifier)?.to_owned())
        }
    }
}

/// How members (and the delivery service's observer) accept credentials.
///
/// * Open mode (no authority): a basic credential whose identifier is the UTF-8 LiveKit
///   identity, or an authority credential (its identity is used, its signature is not
///   checked: nobody pinned an authority).
/// * Authority mode: only authority credentials, signed by a pinned authority for this
///   leaf's signature key, valid now (give or take the clock skew), for the member's room.
///
/// Every leaf advertises both credential types: the group's external sender (the DS) keeps
/// its basic credential, and RFC 9420 requires every leaf to support the credential types
/// in use. mls-rs `tree_index` rejects two leaves with the same identity, matching
/// LiveKit's one-identity-per-room rule.
#[derive(Clone, Debug, Default)]
pub struct LivekitIdentityProvider {
    authority: Option<Arc<Authority>>,
}

impl LivekitIdentityProvider {
    pub fn new(authority: Option<Authority>) -> Self {
        Self {
            authority: authority.map(Arc::new),
        }
    }
}

/// A credential refused by [`LivekitIdentityProvider`]: the engine error saying why (mls-rs
/// carries it through as `IdentityProviderError`; `error.rs` unwraps it again).
#[derive(Debug)]
pub struct IdentityRejected(pub Error);

impl std::fmt::Display for IdentityRejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.message)
    }
}

impl std::error::Error for IdentityRejected {}

impl IntoAnyError for IdentityRejected {
    fn into_dyn_error(self) -> std::result::Result<Box<dyn std::error::Error + Send + Sync>, Self> {
        Ok(self.into())
    }
}

impl From<Error> for IdentityRejected {
    fn from(e: Error) -> Self {
        IdentityRejected(e)
    }
}

impl IdentityProvider for LivekitIdentityProvider {
    type Error = IdentityRejected;

    fn validate_member(
        &self,
        signing_identity: &SigningIdentity,
        timestamp: Option<MlsTime>,
        _context: MemberValidationContext<'_>,
    ) -> std::result::Result<(), Self::Error> {
        match &self.authority {
            Some(authority) => {
                // receivers of a commit get no time from mls-rs: they check against now
                let now = timestamp.map_or_else(now_seconds, |t| t.seconds_since_epoch());
                authority.verify(signing_identity, now)?;
            }
            None => {
                identity_of(signing_identity)?;
            }
        }
        Ok(())
    }

    fn validate_external_sender(
        &self,
        signing_identity: &SigningIdentity,
        _timestamp: Option<MlsTime>,
        _extensions: Option<&ExtensionList>,
    ) -> std::result::Result<(), Self::Error> {
        // the delivery service: a basic credential (its key is pinned by the session)
        let basic = signing_identity.credential.as_basic().ok_or_else(|| {
            IdentityRejected(Error::validation(
                "UnsupportedCredential",
                "the external sender must have a basic credential",
            ))
        })?;
        check_identity(&basic.identifier)?;
        Ok(())
    }

    fn identity(
        &self,
        signing_identity: &SigningIdentity,
        _extensions: &ExtensionList,
    ) -> std::result::Result<Vec<u8>, Self::Error> {
        Ok(identity_of(signing_identity)?.into_bytes())
    }

    fn valid_successor(
        &self,
        predecessor: &SigningIdentity,
        successor: &SigningIdentity,
        _extensions: &ExtensionList,
    ) -> std::result::Result<bool, Self::Error> {
        // a leaf may renew its credential (a new validity period), never change its
        // identity or room
        let room = |si: &SigningIdentity| -> Result<Option<String>> {
            Ok(authority_credential(&si.credential)?.map(|c| c.room))
        };
        Ok(identity_of(predecessor)? == identity_of(successor)?
            && room(predecessor)? == room(successor)?)
    }

    fn supported_types(&self) -> Vec<CredentialType> {
        vec![
            BasicCredential::credential_type(),
            CredentialType::new(AUTHORITY_CREDENTIAL_TYPE),
        ]
    }
}
