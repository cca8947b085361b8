//! Signature keys and the client: one LiveKit participant identity in one cipher suite.

use mls_rs::crypto::{SignaturePublicKey, SignatureSecretKey};
use mls_rs::extension::built_in::ExternalSendersExt;
use mls_rs::identity::basic::BasicCredential;
use mls_rs::identity::SigningIdentity;
use mls_rs::mls_rs_codec::{MlsDecode, MlsEncode};
use mls_rs::storage_provider::in_memory::{InMemoryGroupStateStorage, InMemoryKeyPackageStorage};
use mls_rs::{CipherSuiteProvider, CryptoProvider, ExtensionList, MlsMessage};

use crate::config::{self, check_identity, ClientConfig, LivekitIdentityProvider};
use crate::credential::{Authority, AuthorityCredential};
use crate::error::{Error, ErrorKind, Result};
use crate::group::Group;

/// An Ed25519 (or suite-specific) signature key pair.
#[derive(Clone)]
pub struct SignatureKeyPair {
    cipher_suite: u16,
    secret: SignatureSecretKey,
    public: SignaturePublicKey,
}

impl std::fmt::Debug for SignatureKeyPair {
    // Never print the secret half.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignatureKeyPair")
            .field("cipher_suite", &self.cipher_suite)
            .field("public", &self.public.as_bytes())
            .finish_non_exhaustive()
    }
}

pub(crate) fn suite_provider(cipher_suite: u16) -> Result<impl CipherSuiteProvider + Clone> {
    let suite = config::cipher_suite(cipher_suite)?;
    config::crypto_provider()
        .cipher_suite_provider(suite)
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Unsupported,
                "UnsupportedCipherSuite",
                "no provider",
            )
        })
}

fn crypto_error(e: impl std::fmt::Debug) -> Error {
    Error::new(ErrorKind::Validation, "InvalidKey", format!("{e:?}"))
}

impl SignatureKeyPair {
    pub fn generate(cipher_suite: u16) -> Result<Self> {
        let provider = suite_provider(cipher_suite)?;
        let (secret, public) = provider.signature_key_generate().map_err(crypto_error)?;
        Ok(Self {
            cipher_suite,
            secret,
            public,
        })
    }

    /// Rebuilds a key pair from its secret half; the public half is derived, never trusted.
    pub fn from_secret(cipher_suite: u16, secret: &[u8]) -> Result<Self> {
        let provider = suite_provider(cipher_suite)?;
        let secret = SignatureSecretKey::new_slice(secret);
        let public = provider
            .signature_key_derive_public(&secret)
            .map_err(crypto_error)?;
        Ok(Self {
            cipher_suite,
            secret,
            public,
        })
    }

    pub fn cipher_suite(&self) -> u16 {
        self.cipher_suite
    }

    pub fn public_key(&self) -> &[u8] {
        self.public.as_bytes()
    }

    pub fn secret_key(&self) -> &[u8] {
        self.secret.as_bytes()
    }

    /// A plain signature over `data` with this key (Ed25519 for suite 1), e.g. an identity
    /// authority vouching for a credential (`credential::signed_bytes`).
    pub fn sign(&self, data: &[u8]) -> Result<Vec<u8>> {
        let provider = suite_provider(self.cipher_suite)?;
        provider.sign(&self.secret, data).map_err(crypto_error)
    }

    pub(crate) fn secret(&self) -> &SignatureSecretKey {
        &self.secret
    }

    /// The MLS SigningIdentity of `identity` with this key and a basic credential.
    pub(crate) fn signing_identity(&self, identity: &str) -> Result<SigningIdentity> {
        check_identity(identity.as_bytes())?;
        let credential = BasicCredential::new(identity.as_bytes().to_vec()).into_credential();
        Ok(SigningIdentity::new(credential, self.public.clone()))
    }

    /// The SigningIdentity of this key with an authority credential (its body, as the
    /// app's backend issued it for this key), which must name `identity`.
    pub(crate) fn vouched_identity(
        &self,
        identity: &str,
        credential: &[u8],
    ) -> Result<SigningIdentity> {
        let vouched = AuthorityCredential::decode(credential)?;
        if vouched.identity != identity {
            return Err(Error::invalid_argument(format!(
                "the credential names {:?}, not {:?}",
                vouched.identity, identity
            )));
        }
        Ok(SigningIdentity::new(
            vouched.to_credential()?,
            self.public.clone(),
        ))
    }
}

/// Encodes a SigningIdentity (credential + signature key) in MLS wire format. This is the
/// form in which external senders are listed in a group context.
pub fn encode_signing_identity(identity: &str, public_key: &[u8]) -> Result<Vec<u8>> {
    check_identity(identity.as_bytes())?;
    let credential = BasicCredential::new(identity.as_bytes().to_vec()).into_credential();
    let signing_identity =
        SigningIdentity::new(credential, SignaturePublicKey::from(public_key.to_vec()));
    Ok(signing_identity.mls_encode_to_vec()?)
}

pub(crate) fn decode_signing_identity(bytes: &[u8]) -> Result<SigningIdentity> {
    let mut reader = bytes;
    let signing_identity = SigningIdentity::mls_decode(&mut reader)?;
    if !reader.is_empty() {
        return Err(Error::decode("trailing bytes after SigningIdentity"));
    }
    config::identity_of(&signing_identity)?;
    Ok(signing_identity)
}

/// Parses an MLS message, requiring that nothing follows it.
pub(crate) fn parse_message(bytes: &[u8]) -> Result<MlsMessage> {
    let mut reader = bytes;
    let message = MlsMessage::mls_decode(&mut reader)?;
    if !reader.is_empty() {
        return Err(Error::decode("trailing bytes after MLS message"));
    }
    Ok(message)
}

/// How a client is set up beyond its identity and key.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// The authority credential (its body) the app's identity authority issued for this
    /// client's signature key; None: a basic credential (open mode).
    pub credential: Option<Vec<u8>>,
    /// The authorities this client trusts, for its room: every credential in its groups
    /// must be vouched for by one of them. None: open mode.
    pub authority: Option<Authority>,
    /// False makes add-only commits without an UpdatePath: RFC 9420 allows it (other
    /// implementations do by default), livekit-mls requires a path and its delivery
    /// service refuses such commits. Only for tests of that rule.
    pub require_update_path: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            credential: None,
            authority: None,
            require_update_path: true,
        }
    }
}

/// One participant identity with its signature key, able to make key packages and to
/// create, join and load groups.
#[derive(Clone)]
pub struct Client {
    identity: String,
    key_pair: SignatureKeyPair,
    signing_identity: SigningIdentity,
    inner: mls_rs::Client<ClientConfig>,
    storage: InMemoryGroupStateStorage,
    key_packages: InMemoryKeyPackageStorage,
    options: ClientOptions,
}

impl Client {
    /// A client in open mode with a basic credential.
    pub fn new(identity: &str, key_pair: SignatureKeyPair) -> Result<Self> {
        Self::with_options(identity, key_pair, ClientOptions::default())
    }

    pub fn with_options(
        identity: &str,
        key_pair: SignatureKeyPair,
        options: ClientOptions,
    ) -> Result<Self> {
        Self::build(
            identity,
            key_pair,
            options,
            InMemoryKeyPackageStorage::default(),
        )
    }

    /// The same client with a renewed authority credential (for the same signature key).
    /// Key packages it handed out earlier stay usable: a Welcome for one still joins.
    pub fn renewed(&self, credential: Vec<u8>) -> Result<Self> {
        let options = ClientOptions {
            credential: Some(credential),
            ..self.options.clone()
        };
        let mut client = Self::build(
            &self.identity,
            self.key_pair.clone(),
            options,
            self.key_packages.clone(),
        )?;
        client.storage = self.storage.clone();
        Ok(client)
    }

    fn build(
        identity: &str,
        key_pair: SignatureKeyPair,
        options: ClientOptions,
        key_packages: InMemoryKeyPackageStorage,
    ) -> Result<Self> {
        let signing_identity = match &options.credential {
            Some(credential) => key_pair.vouched_identity(identity, credential)?,
            None => key_pair.signing_identity(identity)?,
        };
        if let Some(authority) = &options.authority {
            // our own credential must pass the checks every other member will make
            authority.verify(&signing_identity, crate::credential::now_seconds())?;
        }
        let suite = config::cipher_suite(key_pair.cipher_suite)?;
        let storage = InMemoryGroupStateStorage::new();
        let inner = mls_rs::Client::builder()
            .crypto_provider(config::crypto_provider())
            .identity_provider(LivekitIdentityProvider::new(options.authority.clone()))
            .mls_rules(config::mls_rules_with(options.require_update_path))
            .key_package_repo(key_packages.clone())
            .group_state_storage(storage.clone())
            .signing_identity(signing_identity.clone(), key_pair.secret.clone(), suite)
            .build();
        Ok(Self {
            identity: identity.to_owned(),
            key_pair,
            signing_identity,
            inner,
            storage,
            key_packages,
            options,
        })
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    pub fn cipher_suite(&self) -> u16 {
        self.key_pair.cipher_suite
    }

    pub fn key_pair(&self) -> &SignatureKeyPair {
        &self.key_pair
    }

    /// This client's SigningIdentity in MLS wire format.
    pub fn signing_identity(&self) -> Result<Vec<u8>> {
        Ok(self.signing_identity.mls_encode_to_vec()?)
    }

    /// A fresh KeyPackage (MLSMessage). Its private keys stay inside this client (and its
    /// clones) until a Welcome consumes them.
    pub fn generate_key_package(&self) -> Result<Vec<u8>> {
        let message = self.inner.generate_key_package_message(
            ExtensionList::default(),
            ExtensionList::default(),
            None,
        )?;
        Ok(message.to_bytes()?)
    }

    /// Creates a one-member group at epoch 0 whose context lists `external_senders`
    /// (encoded SigningIdentities) as the parties allowed to send proposals from outside.
    pub fn create_group(&self, group_id: &[u8], external_senders: &[Vec<u8>]) -> Result<Group> {
        if group_id.is_empty() || group_id.len() > 255 {
            return Err(Error::invalid_argument("group id must be 1..=255 bytes"));
        }
        let mut extensions = ExtensionList::new();
        if !external_senders.is_empty() {
            let senders = external_senders
                .iter()
                .map(|s| decode_signing_identity(s))
                .collect::<Result<Vec<_>>>()?;
            extensions
                .set_from(ExternalSendersExt::new(senders))
                .map_err(|e| Error::decode(e.to_string()))?;
        }
        let group = self.inner.create_group_with_id(
            group_id.to_vec(),
            extensions,
            ExtensionList::default(),
            None,
        )?;
        Ok(Group::new(
            group,
            self.storage.clone(),
            self.options.require_update_path,
        ))
    }

    /// Joins from a Welcome made for one of this client's key packages.
    pub fn join_group(&self, welcome: &[u8]) -> Result<Group> {
        let welcome = parse_message(welcome)?;
        let (mut group, _info) = self.inner.join_group(None, &welcome, None)?;
        // Writing state deletes the consumed key package's private keys (forward secrecy);
        // the written copy itself is dropped at once.
        group.write_to_storage()?;
        self.storage.delete_group(group.group_id());
        Ok(Group::new(
            group,
            self.storage.clone(),
            self.options.require_update_path,
        ))
    }

    /// Joins by external commit from a GroupInfo that allows it. With `replace_leaf`, the
    /// commit also removes that leaf, which must hold this same identity (a stale leaf
    /// from before a crash). Returns the group, already at the new epoch, and the commit
    /// to submit. If the commit is not accepted, discard the group.
    pub fn join_by_external_commit(
        &self,
        group_info: &[u8],
        replace_leaf: Option<u32>,
    ) -> Result<(Group, Vec<u8>)> {
        let group_info = parse_message(group_info)?;
        let mut builder = self.inner.external_commit_builder()?;
        if let Some(leaf) = replace_leaf {
            builder = builder.with_removal(leaf);
        }
        let (group, commit) = builder.build(group_info)?;
        Ok((
            Group::new(
                group,
                self.storage.clone(),
                self.options.require_update_path,
            ),
            commit.to_bytes()?,
        ))
    }

    /// Restores a group from `Group::to_bytes`. The client must hold the same identity.
    pub fn load_group(&self, state: &[u8]) -> Result<Group> {
        let (group_id, data) = crate::group::split_state(state)?;
        let mut storage = self.storage.clone();
        mls_rs::GroupStateStorage::write(
            &mut storage,
            mls_rs_core::group::GroupState {
                id: group_id.to_vec(),
                data: data.to_vec().into(),
            },
            Vec::new(),
            Vec::new(),
        )
        .map_err(|e| Error::new(ErrorKind::Internal, "GroupStorageError", e.to_string()))?;
        let loaded = self.inner.load_group(group_id);
        self.storage.delete_group(group_id);
        let group = Group::new(
            loaded?,
            self.storage.clone(),
            self.options.require_update_path,
        );
        if group.identity()? != self.identity {
            return Err(Error::state(
                "IdentityMismatch",
                "the group state belongs to another identity",
            ));
        }
        Ok(group)
    }
}
