"""The native MLS engine through its Python API: real mls-rs groups of several members."""

from __future__ import annotations

import pytest

from mls_provider import mls

DS_IDENTITY = "livekit-mls-ds"
LABEL = b"livekit-mls test"


def new_client(identity: str) -> mls.MlsClient:
    return mls.MlsClient(identity, mls.SignatureKeyPair.generate())


def new_observer() -> mls.ExternalObserver:
    return mls.ExternalObserver(DS_IDENTITY, mls.SignatureKeyPair.generate())


def assert_agree(groups: dict[str, mls.Group]) -> None:
    """Every member is at the same epoch and exports the same secrets for every identity."""
    epochs = {g.epoch for g in groups.values()}
    assert len(epochs) == 1, epochs
    authenticators = {g.epoch_authenticator() for g in groups.values()}
    assert len(authenticators) == 1
    for identity in groups:
        exported = {g.export_secret(LABEL, identity.encode(), 32) for g in groups.values()}
        assert len(exported) == 1, f"members disagree on the secret of {identity}"
    rosters = {tuple((m.leaf_index, m.identity) for m in g.members()) for g in groups.values()}
    assert len(rosters) == 1


def deliver(message: bytes, groups: dict[str, mls.Group], *, skip: str | None = None) -> None:
    for name, group in groups.items():
        if name != skip:
            group.process_message(message)


class Room:
    """A group driven the way livekit-mls drives it: the DS observes every handshake."""

    def __init__(self, creator: str) -> None:
        self.observer = new_observer()
        self.clients = {creator: new_client(creator)}
        group = self.clients[creator].create_group(b"room-1", [self.observer.signing_identity()])
        self.groups: dict[str, mls.Group] = {creator: group}
        self.observed = self.observer.observe(group.group_info())

    def commit(self, committer: str, **changes: object) -> mls.CommitOutput:
        """Commit, have the DS accept it, then every member (and joiners) process it."""
        output = self.groups[committer].commit(**changes)  # type: ignore[arg-type]
        applied = self.observed.process_message(output.commit)
        assert isinstance(applied, mls.CommitApplied)
        self.groups[committer].apply_pending_commit()
        deliver(output.commit, self.groups, skip=committer)
        for name in [m.identity for m in applied.added]:
            if name not in self.groups and output.welcome is not None:
                self.groups[name] = self.clients[name].join_group(output.welcome)
        for member in applied.removed:
            self.groups.pop(member.identity, None)
        return output

    def ds_propose(self, message: bytes) -> None:
        deliver(message, self.groups)


def test_three_members_agree_at_every_epoch() -> None:
    room = Room("alice")
    assert room.groups["alice"].epoch == 0
    assert room.groups["alice"].external_senders() == [(DS_IDENTITY, room.observer.public_key)]

    # bob by a member's Add (Welcome)
    room.clients["bob"] = new_client("bob")
    room.commit("alice", add=[room.clients["bob"].generate_key_package()])
    assert_agree(room.groups)

    # carol by the DS's external Add, committed by bob (lowest-index rule is the DS's job)
    room.clients["carol"] = new_client("carol")
    proposal, _ = room.observed.propose_add(room.clients["carol"].generate_key_package())
    room.ds_propose(proposal)
    assert room.groups["alice"].pending_proposal_count == 1
    output = room.commit("bob")
    assert output.welcome is not None
    assert set(room.groups) == {"alice", "bob", "carol"}
    assert_agree(room.groups)
    assert room.groups["carol"].epoch == 2

    # dave by external commit from the last GroupInfo
    dave = new_client("dave")
    assert output.group_info is not None
    group, commit = dave.join_by_external_commit(output.group_info)
    applied = room.observed.process_message(commit)
    assert isinstance(applied, mls.CommitApplied) and applied.is_external
    assert [m.identity for m in applied.added] == ["dave"]
    deliver(commit, room.groups)
    room.groups["dave"] = group
    assert_agree(room.groups)
    assert room.groups["dave"].member_count == 4


def test_external_remove_is_committed_and_removed_member_is_locked_out() -> None:
    room = Room("alice")
    for name in ("bob", "carol"):
        room.clients[name] = new_client(name)
    room.commit(
        "alice",
        add=[
            room.clients["bob"].generate_key_package(),
            room.clients["carol"].generate_key_package(),
        ],
    )
    assert_agree(room.groups)
    bob = room.groups["bob"]
    secret_before = bob.export_secret(LABEL, b"alice", 32)

    leaf = room.observed.member_index("bob")
    assert leaf is not None
    proposal, ref = room.observed.propose_remove(leaf)
    info = mls.message_info(proposal)
    assert (info.content_type, info.sender_kind) == ("proposal", "external")
    received = bob.process_message(proposal)
    assert isinstance(received, mls.ProposalReceived)
    assert (received.proposal_type, received.target_identity) == ("remove", "bob")
    assert received.proposal_ref == ref
    room.groups["alice"].process_message(proposal)
    room.groups["carol"].process_message(proposal)

    output = room.groups["carol"].commit()
    assert ref in room.observed.pending_proposal_refs()
    applied = room.observed.process_message(output.commit)
    assert isinstance(applied, mls.CommitApplied)
    assert applied.proposal_refs == [ref]
    assert [m.identity for m in applied.removed] == ["bob"]
    room.groups["carol"].apply_pending_commit()
    room.groups["alice"].process_message(output.commit)
    bob_view = bob.process_message(output.commit)
    assert isinstance(bob_view, mls.CommitApplied) and bob_view.self_removed
    assert bob.is_removed
    del room.groups["bob"]
    assert_agree(room.groups)

    # bob can neither derive the new keys nor follow later epochs
    with pytest.raises(mls.StateError):
        bob.export_secret(LABEL, b"alice", 32)
    later = room.commit("alice")
    with pytest.raises(mls.StateError):
        bob.process_message(later.commit)
    assert room.groups["alice"].export_secret(LABEL, b"alice", 32) != secret_before


def test_observer_accepts_genuine_and_rejects_forged_and_stale_commits() -> None:
    room = Room("alice")
    room.clients["bob"] = new_client("bob")
    room.commit("alice", add=[room.clients["bob"].generate_key_package()])
    epoch = room.observed.epoch

    # Two members commit for the same epoch: the first is accepted, the second is stale.
    first = room.groups["alice"].commit()
    second = room.groups["bob"].commit()
    assert isinstance(room.observed.process_message(first.commit), mls.CommitApplied)
    assert room.observed.epoch == epoch + 1
    with pytest.raises(mls.EpochError):
        room.observed.process_message(second.commit)
    # A replay of the accepted commit is stale too.
    with pytest.raises(mls.EpochError):
        room.observed.process_message(first.commit)
    room.groups["alice"].apply_pending_commit()
    room.groups["bob"].process_message(first.commit)
    assert not room.groups["bob"].has_pending_commit  # the losing commit was dropped

    # Forged: an outsider builds a same-id group at the same epoch and signs as leaf 0.
    mallory = new_client("mallory")
    fake = mallory.create_group(b"room-1")
    while fake.epoch < room.observed.epoch:
        fake.commit()
        fake.apply_pending_commit()
    forged = fake.commit().commit
    info = mls.message_info(forged)
    assert (info.epoch, info.sender_index) == (room.observed.epoch, 0)
    snapshot = room.observed.snapshot()
    with pytest.raises(mls.ValidationError):
        room.observed.process_message(forged)
    assert room.observed.snapshot() == snapshot  # rejected input changed nothing
    with pytest.raises(mls.MlsError):
        room.groups["bob"].process_message(forged)


def test_state_round_trips() -> None:
    room = Room("alice")
    room.clients["bob"] = new_client("bob")
    room.commit("alice", add=[room.clients["bob"].generate_key_package()])

    state = room.groups["bob"].to_bytes()
    restored = room.clients["bob"].load_group(state)
    assert restored.epoch == room.groups["bob"].epoch
    assert restored.export_secret(LABEL, b"x", 32) == room.groups["bob"].export_secret(
        LABEL, b"x", 32
    )
    room.groups["bob"] = restored
    room.commit("alice")
    assert_agree(room.groups)

    # another identity cannot load bob's state
    with pytest.raises(mls.StateError):
        new_client("eve").load_group(state)

    observed = room.observer.load(room.observed.snapshot())
    assert observed.epoch == room.observed.epoch
    assert observed.tree_hash() == room.observed.tree_hash()
    assert [m.identity for m in observed.members()] == ["alice", "bob"]

    pair = room.clients["alice"].key_pair
    again = mls.SignatureKeyPair.from_secret(pair.secret_key, pair.cipher_suite)
    assert again.public_key == pair.public_key
    assert "secret" not in repr(pair).lower() or pair.secret_key.hex() not in repr(pair)


def test_rejoin_by_external_commit_replaces_stale_leaf() -> None:
    room = Room("alice")
    room.clients["bob"] = new_client("bob")
    output = room.commit("alice", add=[room.clients["bob"].generate_key_package()])
    stale_leaf = room.groups["bob"].own_leaf_index

    # bob loses his state; a fresh client of the same identity replaces the old leaf
    room.clients["bob"] = new_client("bob")
    group_info = room.groups["alice"].group_info()
    group, commit = room.clients["bob"].join_by_external_commit(group_info, replace_leaf=stale_leaf)
    applied = room.observed.process_message(commit)
    assert isinstance(applied, mls.CommitApplied)
    assert [m.identity for m in applied.removed] == ["bob"]
    room.groups["alice"].process_message(commit)
    room.groups["bob"] = group
    assert_agree(room.groups)
    assert [m.identity for m in group.members()].count("bob") == 1
    del output


def test_duplicate_identity_and_foreign_key_package_are_rejected() -> None:
    room = Room("alice")
    room.clients["bob"] = new_client("bob")
    room.commit("alice", add=[room.clients["bob"].generate_key_package()])
    with pytest.raises(mls.ValidationError):
        room.groups["alice"].commit(add=[new_client("bob").generate_key_package()])
    assert not room.groups["alice"].has_pending_commit
    info = room.observer.validate_key_package(new_client("carol").generate_key_package())
    assert info.identity == "carol" and info.cipher_suite == mls.DEFAULT_CIPHER_SUITE
    with pytest.raises(mls.DecodeError):
        room.observer.validate_key_package(room.groups["alice"].group_info())


def test_arguments_out_of_range_raise_value_error() -> None:
    group = new_client("alice").create_group(b"g")
    with pytest.raises(ValueError):
        group.export_secret(LABEL, b"", 0)
    with pytest.raises(ValueError):
        group.export_secret(LABEL, b"", mls.MAX_EXPORT_LENGTH + 1)
    with pytest.raises(ValueError):
        new_client("alice").create_group(b"")
    with pytest.raises(ValueError):
        group.commit(remove_identities=["nobody"])
    with pytest.raises(mls.UnsupportedError):
        mls.SignatureKeyPair.generate(0x0004)
    with pytest.raises(mls.ValidationError):
        mls.MlsClient("", mls.SignatureKeyPair.generate())


@pytest.mark.parametrize("suite", mls.SUPPORTED_CIPHER_SUITES)
def test_every_supported_cipher_suite(suite: int) -> None:
    alice = mls.MlsClient("alice", mls.SignatureKeyPair.generate(suite))
    bob = mls.MlsClient("bob", mls.SignatureKeyPair.generate(suite))
    group = alice.create_group(b"g")
    output = group.commit(add=[bob.generate_key_package()])
    group.apply_pending_commit()
    assert output.welcome is not None
    joined = bob.join_group(output.welcome)
    assert joined.cipher_suite == suite
    assert joined.export_secret(LABEL, b"", 16) == group.export_secret(LABEL, b"", 16)
