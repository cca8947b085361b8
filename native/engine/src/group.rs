//! A member's view of one MLS group.

use mls_rs::extension::built_in::ExternalSendersExt;
use mls_rs::group::ReceivedMessage;
use mls_rs::identity::SigningIdentity;
use mls_rs::storage_provider::in_memory::InMemoryGroupStateStorage;
use mls_rs::{ExtensionList, GroupStateStorage};

use crate::client::parse_message;
use crate::client::SignatureKeyPair;
use crate::config::{identity_of, ClientConfig};
use crate::error::{Error, ErrorKind, Result};
use crate::types::{
    commit_applied, members_of, proposal_received, CommitApplied, Member, Received, RosterView,
};

/// Magic prefix of `Group::to_bytes` blobs, versioned.
const STATE_MAGIC: &[u8; 8] = b"LKMLSGS1";

/// Longest exporter output handed out (RFC 9420 allows up to 2^16-1).
pub const MAX_EXPORT_LEN: usize = 1024;

/// The messages a commit produces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitOutput {
    /// The Commit (PublicMessage) to submit to the delivery service.
    pub commit: Vec<u8>,
    /// The Welcome for the members this commit adds, if any.
    pub welcome: Option<Vec<u8>>,
    /// The new epoch's GroupInfo (with ratchet tree; allows external commits).
    pub group_info: Option<Vec<u8>>,
    /// Proposals the commit left out because our rules refused them: for an Add, the
    /// identity it would have added (or why it has none); otherwise the proposal type.
    pub left_out: Vec<String>,
}

/// One member's MLS group state. Every mutating call leaves the state unchanged on error.
pub struct Group {
    inner: mls_rs::Group<ClientConfig>,
    storage: InMemoryGroupStateStorage,
    removed: bool,
    /// Whether the pending commit (ours, not yet applied) carries an UpdatePath: mls-rs
    /// keeps the pending commit out of reach, so it is noted when the commit is made. A
    /// group restored with a pending commit assumes its client's rule.
    pending_has_path: bool,
}

impl RosterView for mls_rs::Group<ClientConfig> {
    fn member_at(&self, leaf_index: u32) -> Option<mls_rs::group::Member> {
        self.member_at_index(leaf_index)
    }

    fn leaf_of(&self, signing_identity: &SigningIdentity) -> Option<u32> {
        let identity = identity_of(signing_identity).ok()?;
        self.member_with_identity(identity.as_bytes())
            .ok()
            .map(|m| m.index)
    }

    fn occupied_leaves(&self) -> Vec<u32> {
        self.roster().members_iter().map(|m| m.index).collect()
    }
}

/// (identity, signature key) of each entry of a group context's external senders list.
pub(crate) fn external_senders_of(extensions: &ExtensionList) -> Result<Vec<(String, Vec<u8>)>> {
    let ext = extensions
        .get_as::<ExternalSendersExt>()
        .map_err(|e| Error::decode(e.to_string()))?;
    ext.map(|e| e.allowed_senders)
        .unwrap_or_default()
        .iter()
        .map(|s| Ok((identity_of(s)?, s.signature_key.as_bytes().to_vec())))
        .collect()
}

pub(crate) fn split_state(state: &[u8]) -> Result<(&[u8], &[u8])> {
    let rest = state
        .strip_prefix(STATE_MAGIC.as_slice())
        .ok_or_else(|| Error::decode("not a livekit-mls group state (bad magic)"))?;
    let (len, rest) = rest
        .split_first()
        .ok_or_else(|| Error::decode("truncated group state"))?;
    let len = usize::from(*len);
    if len == 0 || rest.len() < len {
        return Err(Error::decode("truncated group state"));
    }
    Ok(rest.split_at(len))
}

impl Group {
    pub(crate) fn new(
        inner: mls_rs::Group<ClientConfig>,
        storage: InMemoryGroupStateStorage,
        path_required: bool,
    ) -> Self {
        Self {
            inner,
            storage,
            removed: false,
            pending_has_path: path_required,
        }
    }

    fn usable(&self) -> Result<()> {
        if self.removed {
            Err(Error::state(
                "RemovedFromGroup",
                "this member was removed from the group; join again",
            ))
        } else {
            Ok(())
        }
    }

    pub fn group_id(&self) -> &[u8] {
        self.inner.group_id()
    }

    pub fn epoch(&self) -> u64 {
        self.inner.current_epoch()
    }

    pub fn cipher_suite(&self) -> u16 {
        self.inner.cipher_suite().into()
    }

    pub fn own_leaf_index(&self) -> u32 {
        self.inner.current_member_index()
    }

    pub fn identity(&self) -> Result<String> {
        identity_of(self.inner.current_member_signing_identity()?)
    }

    pub fn is_removed(&self) -> bool {
        self.removed
    }

    pub fn members(&self) -> Result<Vec<Member>> {
        members_of(self.inner.roster())
    }

    pub fn member_count(&self) -> usize {
        self.inner.roster().members_iter().count()
    }

    pub fn member_index(&self, identity: &str) -> Option<u32> {
        self.inner
            .member_with_identity(identity.as_bytes())
            .ok()
            .map(|m| m.index)
    }

    pub fn member_at(&self, leaf_index: u32) -> Result<Option<Member>> {
        self.inner.member_info(leaf_index)
    }

    /// The external senders (identity, signature key) the group context allows.
    pub fn external_senders(&self) -> Result<Vec<(String, Vec<u8>)>> {
        external_senders_of(&self.inner.context().extensions)
    }

    pub fn has_pending_commit(&self) -> bool {
        self.inner.has_pending_commit()
    }

    /// Number of cached by-reference proposals the next commit will include.
    pub fn pending_proposal_count(&self) -> usize {
        self.inner.get_cached_proposals().len()
    }

    /// One commit for a batch of changes: adds the key packages, removes the leaves, and
    /// includes every cached by-reference proposal. The commit stays pending until
    /// `apply_pending_commit` (after the delivery service accepted it) or
    /// `discard_pending_commit`.
    pub fn commit(&mut self, add: &[Vec<u8>], remove: &[u32]) -> Result<CommitOutput> {
        self.usable()?;
        let key_packages = add
            .iter()
            .map(|kp| parse_message(kp))
            .collect::<Result<Vec<_>>>()?;
        let mut builder = self.inner.commit_builder();
        for kp in key_packages {
            builder = builder.add_member(kp)?;
        }
        for leaf in remove {
            builder = builder.remove_member(*leaf)?;
        }
        let output = builder.build()?;
        self.finish_commit(output)
    }

    /// A commit of every cached proposal that also renews this member's credential: the
    /// app's identity authority issued `credential` (an authority credential body, for the
    /// same identity) for `key_pair`, which becomes this member's signature key.
    pub fn commit_renewal(
        &mut self,
        key_pair: &SignatureKeyPair,
        credential: &[u8],
    ) -> Result<CommitOutput> {
        self.usable()?;
        let signing_identity = key_pair.vouched_identity(&self.identity()?, credential)?;
        let output = self
            .inner
            .commit_builder()
            .set_new_signing_identity(key_pair.secret().clone(), signing_identity)
            .build()?;
        self.finish_commit(output)
    }

    fn finish_commit(&mut self, output: mls_rs::group::CommitOutput) -> Result<CommitOutput> {
        let welcome = output
            .welcome_messages
            .first()
            .map(|w| w.to_bytes())
            .transpose()?;
        let group_info = output
            .external_commit_group_info
            .as_ref()
            .map(|g| g.to_bytes())
            .transpose()?;
        self.pending_has_path = output.commit_message.commit_path_leaf_node().is_some();
        // proposals our rules refused (e.g. an Add whose credential our identity provider
        // rejects): the commit leaves them out
        let left_out = output
            .unused_proposals
            .iter()
            .map(|info| match &info.proposal {
                mls_rs::group::proposal::Proposal::Add(add) => {
                    identity_of(add.signing_identity()).unwrap_or_else(|e| e.message)
                }
                other => crate::types::proposal_type_name(other).to_owned(),
            })
            .collect();
        let commit = match output.commit_message.to_bytes() {
            Ok(c) => c,
            Err(e) => {
                self.inner.clear_pending_commit();
                return Err(e.into());
            }
        };
        Ok(CommitOutput {
            commit,
            welcome,
            group_info,
            left_out,
        })
    }

    pub fn apply_pending_commit(&mut self) -> Result<CommitApplied> {
        self.usable()?;
        if !self.inner.has_pending_commit() {
            return Err(Error::state(
                "PendingCommitNotFound",
                "there is no pending commit",
            ));
        }
        let has_path = self.pending_has_path;
        let desc = self.inner.apply_pending_commit()?;
        commit_applied(&desc, &self.inner, has_path)
    }

    pub fn discard_pending_commit(&mut self) {
        self.inner.clear_pending_commit();
    }

    /// Validates and applies a proposal or commit. A commit this member made itself and
    /// still holds as pending is recognised and applied.
    pub fn process_message(&mut self, message: &[u8]) -> Result<Received> {
        self.usable()?;
        let message = parse_message(message)?;
        let has_path = message.commit_path_leaf_node().is_some();
        match self.inner.process_incoming_message(message)? {
            ReceivedMessage::Proposal(desc) => {
                Ok(Received::Proposal(proposal_received(&desc, &self.inner)?))
            }
            ReceivedMessage::Commit(desc) => {
                let applied = commit_applied(&desc, &self.inner, has_path)?;
                if applied.self_removed {
                    self.removed = true;
                }
                Ok(Received::Commit(applied))
            }
            ReceivedMessage::ApplicationMessage(_) => Ok(Received::Other("application")),
            ReceivedMessage::GroupInfo(_) => Ok(Received::Other("group_info")),
            ReceivedMessage::Welcome => Ok(Received::Other("welcome")),
            ReceivedMessage::KeyPackage(_) => Ok(Received::Other("key_package")),
        }
    }

    /// MLS-Exporter(label, context, length) of the current epoch (RFC 9420 §8.5).
    pub fn export_secret(&self, label: &[u8], context: &[u8], length: usize) -> Result<Vec<u8>> {
        self.usable()?;
        if length == 0 || length > MAX_EXPORT_LEN {
            return Err(Error::invalid_argument(format!(
                "export length must be 1..={MAX_EXPORT_LEN}"
            )));
        }
        Ok(self
            .inner
            .export_secret(label, context, length)?
            .as_bytes()
            .to_vec())
    }

    pub fn epoch_authenticator(&self) -> Result<Vec<u8>> {
        self.usable()?;
        Ok(self.inner.epoch_authenticator()?.as_bytes().to_vec())
    }

    /// A signed GroupInfo of the current epoch that allows external commits.
    pub fn group_info(&self, with_ratchet_tree: bool) -> Result<Vec<u8>> {
        self.usable()?;
        Ok(self
            .inner
            .group_info_message_allowing_ext_commit(with_ratchet_tree)?
            .to_bytes()?)
    }

    /// The whole state, secrets included (signature key, epoch secrets, exporter secret):
    /// store it encrypted. Restore with `Client::load_group`.
    pub fn to_bytes(&mut self) -> Result<Vec<u8>> {
        self.usable()?;
        self.inner.write_to_storage()?;
        let group_id = self.inner.group_id().to_vec();
        let data = self
            .storage
            .state(&group_id)
            .map_err(|e| Error::new(ErrorKind::Internal, "GroupStorageError", e.to_string()))?
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Internal,
                    "GroupStorageError",
                    "state not written",
                )
            })?;
        self.storage.delete_group(&group_id);
        let mut out = Vec::with_capacity(STATE_MAGIC.len() + 1 + group_id.len() + data.len());
        out.extend_from_slice(STATE_MAGIC);
        // group ids are at most 255 bytes (checked at creation; a joined group's id comes
        // from a validated Welcome and is re-checked here).
        let len = u8::try_from(group_id.len())
            .map_err(|_| Error::state("GroupIdTooLong", "group id longer than 255 bytes"))?;
        out.push(len);
        out.extend_from_slice(&group_id);
        out.extend_from_slice(&data);
        Ok(out)
    }
}
