//! Plain result types shared by members and the observer: what a message did.

use mls_rs::group::proposal::Proposal;
use mls_rs::group::{CommitEffect, CommitMessageDescription, ProposalMessageDescription, Sender};
use mls_rs::identity::SigningIdentity;
use mls_rs::mls_rules::ProposalSource;

use crate::config::identity_of;
use crate::credential::authority_credential;
use crate::error::{Error, Result};

/// A leaf of the ratchet tree: who is in the group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub leaf_index: u32,
    pub identity: String,
    pub signature_key: Vec<u8>,
    /// When its authority credential expires (Unix seconds); None for a basic credential.
    pub not_after: Option<u64>,
}

impl Member {
    pub(crate) fn from_signing_identity(leaf_index: u32, si: &SigningIdentity) -> Result<Self> {
        Ok(Self {
            leaf_index,
            identity: identity_of(si)?,
            signature_key: si.signature_key.as_bytes().to_vec(),
            not_after: authority_credential(&si.credential)?.map(|c| c.not_after),
        })
    }

    pub(crate) fn from_mls(member: &mls_rs::group::Member) -> Result<Self> {
        Self::from_signing_identity(member.index, &member.signing_identity)
    }
}

/// Who sent a proposal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SenderKind {
    /// A member, by leaf index.
    Member,
    /// An entry of the group's external senders list (the delivery service), by position.
    External,
    /// A non-member proposing its own addition.
    NewMember,
}

impl SenderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SenderKind::Member => "member",
            SenderKind::External => "external",
            SenderKind::NewMember => "new_member",
        }
    }
}

pub(crate) fn sender_parts(sender: &Sender) -> (SenderKind, Option<u32>) {
    match sender {
        Sender::Member(i) => (SenderKind::Member, Some(*i)),
        Sender::External(i) => (SenderKind::External, Some(*i)),
        _ => (SenderKind::NewMember, None),
    }
}

pub(crate) fn proposal_type_name(proposal: &Proposal) -> &'static str {
    match proposal {
        Proposal::Add(_) => "add",
        Proposal::Update(_) => "update",
        Proposal::Remove(_) => "remove",
        Proposal::Psk(_) => "psk",
        Proposal::ReInit(_) => "reinit",
        Proposal::ExternalInit(_) => "external_init",
        Proposal::GroupContextExtensions(_) => "group_context_extensions",
        _ => "custom",
    }
}

/// A proposal was validated and cached; the next commit will include it by reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProposalReceived {
    pub proposal_type: &'static str,
    pub sender_kind: SenderKind,
    pub sender_index: Option<u32>,
    /// The member an Add brings in or a Remove takes out.
    pub target_identity: Option<String>,
    /// The leaf a Remove takes out.
    pub target_leaf_index: Option<u32>,
    pub proposal_ref: Vec<u8>,
}

/// A commit was validated and applied: the group is at `epoch` now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitApplied {
    pub epoch: u64,
    /// Leaf index of the committer (for an external commit: the joiner's new leaf).
    pub committer: u32,
    pub is_external: bool,
    /// Members that joined in this commit, with their leaf index in the new epoch.
    pub added: Vec<Member>,
    /// Members that left in this commit, with the leaf index they had.
    pub removed: Vec<Member>,
    /// True when this commit removed the local member: the group is no longer usable.
    pub self_removed: bool,
    /// References of the by-reference proposals this commit applied.
    pub proposal_refs: Vec<Vec<u8>>,
    /// Types of the proposals the commit carried by value.
    pub by_value_proposals: Vec<&'static str>,
    /// Whether the commit carried an UpdatePath (livekit-mls requires one on every commit).
    pub has_path: bool,
}

/// What processing a message did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Received {
    Proposal(ProposalReceived),
    Commit(CommitApplied),
    /// A message that changes nothing here (application data, welcome, group info, ...).
    Other(&'static str),
}

/// Looks up members of a group state (a member's group or the observer's).
pub(crate) trait RosterView {
    fn member_at(&self, leaf_index: u32) -> Option<mls_rs::group::Member>;

    /// The member at `leaf_index`, if any, as the binding reports it.
    fn member_info(&self, leaf_index: u32) -> Result<Option<Member>> {
        self.member_at(leaf_index)
            .map(|m| Member::from_mls(&m))
            .transpose()
    }

    /// Leaf of a signing identity, in O(1) thanks to mls-rs `tree_index`.
    fn leaf_of(&self, signing_identity: &SigningIdentity) -> Option<u32>;

    /// Leaf indices of every member, in leaf order.
    fn occupied_leaves(&self) -> Vec<u32>;
}

/// Every member of a roster (leaf order).
pub(crate) fn members_of(roster: mls_rs::group::Roster<'_>) -> Result<Vec<Member>> {
    roster
        .members_iter()
        .map(|m| Member::from_mls(&m))
        .collect()
}

pub(crate) fn proposal_received(
    desc: &ProposalMessageDescription,
    roster: &dyn RosterView,
) -> Result<ProposalReceived> {
    let (sender_kind, sender_index) = match desc.sender {
        mls_rs::group::ProposalSender::Member(i) => (SenderKind::Member, Some(i)),
        mls_rs::group::ProposalSender::External(i) => (SenderKind::External, Some(i)),
        mls_rs::group::ProposalSender::NewMember => (SenderKind::NewMember, None),
    };
    let (target_identity, target_leaf_index) = match &desc.proposal {
        Proposal::Add(add) => (Some(identity_of(add.signing_identity())?), None),
        Proposal::Remove(remove) => {
            let leaf = remove.to_remove();
            let identity = roster
                .member_at(leaf)
                .map(|m| identity_of(&m.signing_identity))
                .transpose()?;
            (identity, Some(leaf))
        }
        _ => (None, None),
    };
    Ok(ProposalReceived {
        proposal_type: proposal_type_name(&desc.proposal),
        sender_kind,
        sender_index,
        target_identity,
        target_leaf_index,
        proposal_ref: desc.proposal_ref(),
    })
}

/// Builds the typed result of a commit. `new_roster` resolves leaf indices in the new
/// epoch; for a member the commit removed, whose group stays at the prior epoch, it is the
/// prior roster and the added members' leaves are worked out from it instead.
pub(crate) fn commit_applied(
    desc: &CommitMessageDescription,
    new_roster: &dyn RosterView,
    has_path: bool,
) -> Result<CommitApplied> {
    let (new_epoch, self_removed) = match &desc.effect {
        CommitEffect::NewEpoch(new_epoch) => (new_epoch, false),
        CommitEffect::Removed { new_epoch, .. } => (new_epoch, true),
        CommitEffect::ReInit(_) => {
            return Err(Error::validation(
                "UnsupportedReInit",
                "ReInit commits are not used by livekit-mls",
            ))
        }
    };

    let mut added = Vec::new();
    let mut removed = Vec::new();
    let mut proposal_refs = Vec::new();
    let mut by_value_proposals = Vec::new();
    let mut add_identities = Vec::new();

    for info in new_epoch.applied_proposals() {
        match &info.source {
            ProposalSource::ByReference(r) => proposal_refs.push(r.as_slice().to_vec()),
            _ => by_value_proposals.push(proposal_type_name(&info.proposal)),
        }
        match &info.proposal {
            Proposal::Add(add) => add_identities.push(add.signing_identity()),
            Proposal::Remove(remove) => {
                if let Some(m) = new_epoch.prior_state().member_at_index(remove.to_remove()) {
                    removed.push(Member::from_mls(&m)?);
                }
            }
            _ => {}
        }
    }

    let mut free_leaves = if self_removed {
        Some(FreeLeaves::after_removals(new_roster, &removed))
    } else {
        None
    };
    for signing_identity in add_identities {
        let leaf_index = match free_leaves.as_mut() {
            Some(free) => free.take(),
            None => new_roster.leaf_of(signing_identity).ok_or_else(|| {
                Error::new(
                    crate::error::ErrorKind::Internal,
                    "AddedMemberNotFound",
                    "an added member is missing from the new tree",
                )
            })?,
        };
        added.push(Member::from_signing_identity(leaf_index, signing_identity)?);
    }

    if desc.is_external {
        if let Some(m) = new_roster.member_at(desc.committer) {
            added.push(Member::from_mls(&m)?);
        }
    }

    Ok(CommitApplied {
        epoch: new_epoch.epoch(),
        committer: desc.committer,
        is_external: desc.is_external,
        added,
        removed,
        self_removed,
        proposal_refs,
        by_value_proposals,
        has_path,
    })
}

/// The leaves Adds will take, for a member removed by the commit (its group never moves
/// to the new epoch). RFC 9420 §12.1.1: each Add, in commit order, takes the leftmost blank
/// leaf after the commit's Removes, or extends the tree.
struct FreeLeaves {
    occupied: std::collections::BTreeSet<u32>,
}

impl FreeLeaves {
    fn after_removals(prior_roster: &dyn RosterView, removed: &[Member]) -> Self {
        let mut occupied: std::collections::BTreeSet<u32> =
            prior_roster.occupied_leaves().into_iter().collect();
        for member in removed {
            occupied.remove(&member.leaf_index);
        }
        Self { occupied }
    }

    fn take(&mut self) -> u32 {
        let leaf = (0..)
            .find(|i| !self.occupied.contains(i))
            .unwrap_or(u32::MAX);
        self.occupied.insert(leaf);
        leaf
    }
}

/// Routing facts readable without any group state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageInfo {
    /// "public_message", "private_message", "welcome", "group_info" or "key_package".
    pub wire_format: &'static str,
    /// "proposal", "commit", "application" for handshake/application messages.
    pub content_type: Option<&'static str>,
    pub group_id: Option<Vec<u8>>,
    pub epoch: Option<u64>,
    pub sender_kind: Option<SenderKind>,
    pub sender_index: Option<u32>,
    pub cipher_suite: Option<u16>,
    /// For a Welcome: the KeyPackageRefs of its recipients.
    pub welcome_recipients: Vec<Vec<u8>>,
    /// For a KeyPackage: its KeyPackageRef (RFC 9420 §5.2), how Welcomes name it.
    pub key_package_ref: Option<Vec<u8>>,
}

pub fn message_info(bytes: &[u8]) -> Result<MessageInfo> {
    use mls_rs::group::ContentType;
    use mls_rs::MlsMessageDescription as D;

    // strict like every other entry point: trailing bytes are an error
    let message = crate::client::parse_message(bytes)?;
    let content_name = |c: ContentType| match c {
        ContentType::Proposal => "proposal",
        ContentType::Commit => "commit",
        _ => "application",
    };
    let mut info = MessageInfo {
        wire_format: "public_message",
        content_type: None,
        group_id: message.group_id().map(<[u8]>::to_vec),
        epoch: message.epoch(),
        sender_kind: None,
        sender_index: None,
        cipher_suite: message.cipher_suite().map(u16::from),
        welcome_recipients: Vec::new(),
        key_package_ref: None,
    };
    match message.description() {
        D::PublicProtocolMessage {
            content_type,
            sender,
            ..
        } => {
            let (kind, index) = sender_parts(&sender);
            info.content_type = Some(content_name(content_type));
            info.sender_kind = Some(kind);
            info.sender_index = index;
        }
        D::PrivateProtocolMessage { content_type, .. } => {
            info.wire_format = "private_message";
            info.content_type = Some(content_name(content_type));
        }
        D::Welcome {
            key_package_refs, ..
        } => {
            info.wire_format = "welcome";
            info.welcome_recipients = key_package_refs.iter().map(|r| r.to_vec()).collect();
        }
        D::GroupInfo => info.wire_format = "group_info",
        D::KeyPackage => {
            info.wire_format = "key_package";
            if let Some(suite) = info.cipher_suite {
                let provider = crate::client::suite_provider(suite)?;
                info.key_package_ref = message
                    .key_package_reference(&provider)?
                    .map(|r| r.to_vec());
            }
        }
    }
    Ok(info)
}
