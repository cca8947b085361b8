//! The delivery service's side: an external observer that follows a group from its
//! GroupInfo, validates public handshake messages, and issues external proposals signed
//! with the service's key. It never holds an epoch secret, so it cannot derive any key
//! a member exports.

use mls_rs::external_client::{
    ExternalClient, ExternalGroup, ExternalReceivedMessage, ExternalSnapshot,
};
use mls_rs::identity::SigningIdentity;
use mls_rs::MlsMessage;

use crate::client::{encode_signing_identity, parse_message, suite_provider, SignatureKeyPair};
use crate::config::{self, identity_of, LivekitIdentityProvider, ObserverConfig};
use crate::credential::{authority_credential, Authority};
use crate::error::{Error, Result};
use crate::types::{commit_applied, members_of, proposal_received, Member, Received, RosterView};

/// What the observer learnt from a key package it validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyPackageInfo {
    pub identity: String,
    pub cipher_suite: u16,
    pub signature_key: Vec<u8>,
    /// KeyPackageRef (RFC 9420 §5.2): how a Welcome names its recipients.
    pub reference: Vec<u8>,
    /// For an authority credential: the room it names and when it expires (Unix s).
    pub room: Option<String>,
    pub not_after: Option<u64>,
}

/// The delivery service's MLS identity: its signing key and the observer client.
pub struct Observer {
    identity: String,
    key_pair: SignatureKeyPair,
    inner: ExternalClient<ObserverConfig>,
}

impl Observer {
    /// The DS's observer; with an `authority` (no room: the DS checks each key package's
    /// room against its caller's token), every credential must be vouched for by it.
    pub fn new(
        identity: &str,
        key_pair: SignatureKeyPair,
        authority: Option<Authority>,
    ) -> Result<Self> {
        let signing_identity = key_pair.signing_identity(identity)?;
        let inner = ExternalClient::builder()
            .crypto_provider(config::crypto_provider())
            .identity_provider(LivekitIdentityProvider::new(authority))
            .mls_rules(config::mls_rules())
            .signer(key_pair.secret().clone(), signing_identity)
            .build();
        Ok(Self {
            identity: identity.to_owned(),
            key_pair,
            inner,
        })
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    pub fn key_pair(&self) -> &SignatureKeyPair {
        &self.key_pair
    }

    /// The SigningIdentity to list in a group's external senders extension.
    pub fn signing_identity(&self) -> Result<Vec<u8>> {
        encode_signing_identity(&self.identity, self.key_pair.public_key())
    }

    /// Starts following a group from a GroupInfo that carries the ratchet tree.
    pub fn observe(&self, group_info: &[u8]) -> Result<ObservedGroup> {
        let message = parse_message(group_info)?;
        let group = self.inner.observe_group(message, None, None)?;
        Ok(ObservedGroup { inner: group })
    }

    pub fn load(&self, snapshot: &[u8]) -> Result<ObservedGroup> {
        let snapshot = ExternalSnapshot::from_bytes(snapshot)?;
        Ok(ObservedGroup {
            inner: self.inner.load_group(snapshot)?,
        })
    }

    /// Validates a KeyPackage (signature, lifetime, credential) without any group.
    pub fn validate_key_package(&self, key_package: &[u8]) -> Result<KeyPackageInfo> {
        let message = parse_message(key_package)?;
        let cipher_suite = message
            .cipher_suite()
            .ok_or_else(|| Error::decode("not a key package"))?;
        let provider = suite_provider(cipher_suite.into())?;
        let reference = message
            .key_package_reference(&provider)?
            .ok_or_else(|| Error::decode("not a key package"))?;
        let kp = self.inner.validate_key_package(message, None)?;
        let signing_identity = kp.signing_identity();
        let vouched = authority_credential(&signing_identity.credential)?;
        Ok(KeyPackageInfo {
            identity: identity_of(signing_identity)?,
            cipher_suite: cipher_suite.into(),
            signature_key: signing_identity.signature_key.as_bytes().to_vec(),
            reference: reference.to_vec(),
            room: vouched.as_ref().map(|c| c.room.clone()),
            not_after: vouched.map(|c| c.not_after),
        })
    }
}

/// The public state of one group as the observer follows it. `Clone` is cheap enough to
/// try a commit on a copy and keep the copy only if the commit is accepted.
#[derive(Clone)]
pub struct ObservedGroup {
    inner: ExternalGroup<ObserverConfig>,
}

impl RosterView for ExternalGroup<ObserverConfig> {
    fn member_at(&self, leaf_index: u32) -> Option<mls_rs::group::Member> {
        self.roster().member_with_index(leaf_index).ok()
    }

    fn leaf_of(&self, signing_identity: &SigningIdentity) -> Option<u32> {
        self.get_member_with_identity(signing_identity)
            .ok()
            .map(|m| m.index)
    }

    fn occupied_leaves(&self) -> Vec<u32> {
        self.roster().members_iter().map(|m| m.index).collect()
    }
}

impl ObservedGroup {
    pub fn group_id(&self) -> &[u8] {
        &self.inner.group_context().group_id
    }

    pub fn epoch(&self) -> u64 {
        self.inner.group_context().epoch
    }

    pub fn cipher_suite(&self) -> u16 {
        self.inner.group_context().cipher_suite.into()
    }

    /// The external senders (identity, signature key) the group context allows.
    pub fn external_senders(&self) -> Result<Vec<(String, Vec<u8>)>> {
        crate::group::external_senders_of(&self.inner.group_context().extensions)
    }

    pub fn members(&self) -> Result<Vec<Member>> {
        members_of(self.inner.roster())
    }

    pub fn member_at(&self, leaf_index: u32) -> Result<Option<Member>> {
        self.inner.member_info(leaf_index)
    }

    pub fn member_index(&self, identity: &str) -> Option<u32> {
        self.inner
            .roster()
            .members_iter()
            .find(|m| identity_of(&m.signing_identity).is_ok_and(|i| i == identity))
            .map(|m| m.index)
    }

    /// Validates a public proposal or commit and applies it to the observed state.
    /// Messages the observer cannot read (PrivateMessage) are rejected: every handshake
    /// in livekit-mls must be public so it can be validated here.
    pub fn process_message(&mut self, message: &[u8]) -> Result<Received> {
        let message = parse_message(message)?;
        let has_path = message.commit_path_leaf_node().is_some();
        match self.inner.process_incoming_message(message)? {
            ExternalReceivedMessage::Proposal(desc) => {
                Ok(Received::Proposal(proposal_received(&desc, &self.inner)?))
            }
            ExternalReceivedMessage::Commit(desc) => Ok(Received::Commit(commit_applied(
                &desc,
                &self.inner,
                has_path,
            )?)),
            ExternalReceivedMessage::Ciphertext(_) => Err(Error::validation(
                "EncryptedHandshake",
                "encrypted messages cannot be validated by the observer",
            )),
            ExternalReceivedMessage::GroupInfo(_) => Ok(Received::Other("group_info")),
            ExternalReceivedMessage::Welcome => Ok(Received::Other("welcome")),
            ExternalReceivedMessage::KeyPackage(_) => Ok(Received::Other("key_package")),
        }
    }

    fn proposal_ref(&self, message: MlsMessage) -> Result<Vec<u8>> {
        let provider = suite_provider(self.cipher_suite())?;
        message
            .into_proposal_reference(&provider)?
            .ok_or_else(|| Error::decode("not a public proposal"))
    }

    /// An external Add of `key_package`, signed by the observer's key; returns the
    /// proposal message and its reference. The proposal is cached here too.
    pub fn propose_add(&mut self, key_package: &[u8]) -> Result<(Vec<u8>, Vec<u8>)> {
        let kp = parse_message(key_package)?;
        let message = self.inner.propose_add(kp, Vec::new())?;
        let bytes = message.to_bytes()?;
        Ok((bytes, self.proposal_ref(message)?))
    }

    /// An external Remove of `leaf_index`, signed by the observer's key.
    pub fn propose_remove(&mut self, leaf_index: u32) -> Result<(Vec<u8>, Vec<u8>)> {
        let message = self.inner.propose_remove(leaf_index, Vec::new())?;
        let bytes = message.to_bytes()?;
        Ok((bytes, self.proposal_ref(message)?))
    }

    /// References of the proposals cached for the current epoch.
    pub fn pending_proposal_refs(&self) -> Vec<Vec<u8>> {
        self.inner
            .get_cached_proposals()
            .iter()
            .map(|p| p.proposal_ref().as_slice().to_vec())
            .collect()
    }

    pub fn clear_proposals(&mut self) {
        self.inner.clear_proposal_cache();
    }

    /// Public state only (tree, context, cached proposals): no secrets.
    pub fn snapshot(&self) -> Result<Vec<u8>> {
        Ok(self.inner.snapshot().to_bytes()?)
    }

    /// Whether `group_info` describes exactly the observed epoch: its GroupContext
    /// (group id, epoch, tree hash, confirmed transcript hash, extensions) equals the
    /// one this observer derived. Its signature is not checked here, only if it is ever
    /// observed; this stops a committer from storing a GroupInfo of another epoch or
    /// group next to its commit, not one with a bad signature.
    pub fn describes(&self, group_info: &[u8]) -> Result<bool> {
        let message = parse_message(group_info)?;
        let info = message
            .as_group_info()
            .ok_or_else(|| Error::decode("not a GroupInfo"))?;
        Ok(info.group_context() == self.inner.group_context())
    }

    /// Hash of the current ratchet tree, useful for comparing observers.
    pub fn tree_hash(&self) -> Vec<u8> {
        self.inner.tree_hash().to_vec()
    }
}
