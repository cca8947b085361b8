//! The engine's life cycle of a room, as the delivery service and members drive it:
//! create with the DS as external sender, DS-issued Add and Remove proposals committed by
//! a member, a Welcome, and everyone agreeing on exported secrets at every epoch.

mod common;

use common::{client, commit_of};
use mls_engine::{ErrorKind, Group, ObservedGroup, Observer, SignatureKeyPair};

fn secret(group: &Group, identity: &str) -> Vec<u8> {
    group
        .export_secret(b"livekit-mls v1 sender key", identity.as_bytes(), 32)
        .unwrap()
}

#[test]
fn a_room_grows_and_shrinks_through_ds_proposals() {
    let ds = Observer::new(
        "livekit-mls-ds",
        SignatureKeyPair::generate(1).unwrap(),
        None,
    )
    .unwrap();
    let alice = client("alice");
    let bob = client("bob");

    // alice creates the room's group; the DS starts observing it
    let mut alice_group = alice
        .create_group(b"room", &[ds.signing_identity().unwrap()])
        .unwrap();
    let mut observed: ObservedGroup = ds.observe(&alice_group.group_info(true).unwrap()).unwrap();
    assert_eq!(
        alice_group.external_senders().unwrap(),
        vec![(
            "livekit-mls-ds".to_owned(),
            ds.key_pair().public_key().to_vec()
        )]
    );

    // bob joins: the DS proposes his key package, alice commits it, bob uses the Welcome
    let (proposal, reference) = observed
        .propose_add(&bob.generate_key_package().unwrap())
        .unwrap();
    alice_group.process_message(&proposal).unwrap();
    let output = alice_group.commit(&[], &[]).unwrap();
    let accepted = commit_of(observed.process_message(&output.commit).unwrap());
    assert_eq!(accepted.proposal_refs, vec![reference]);
    assert_eq!(accepted.added[0].identity, "bob");
    alice_group.apply_pending_commit().unwrap();
    let mut bob_group = bob.join_group(&output.welcome.unwrap()).unwrap();
    assert_eq!((alice_group.epoch(), bob_group.epoch()), (1, 1));
    assert_eq!(secret(&alice_group, "bob"), secret(&bob_group, "bob"));
    assert_eq!(
        alice_group.epoch_authenticator().unwrap(),
        bob_group.epoch_authenticator().unwrap()
    );

    // the DS removes bob; alice commits; bob learns he is out and can do nothing more
    let (proposal, _) = observed.propose_remove(1).unwrap();
    alice_group.process_message(&proposal).unwrap();
    bob_group.process_message(&proposal).unwrap();
    let output = alice_group.commit(&[], &[]).unwrap();
    commit_of(observed.process_message(&output.commit).unwrap());
    alice_group.apply_pending_commit().unwrap();
    let seen_by_bob = commit_of(bob_group.process_message(&output.commit).unwrap());
    assert!(seen_by_bob.self_removed);
    let err = bob_group.export_secret(b"x", b"", 32).unwrap_err();
    assert_eq!(err.kind, ErrorKind::State);
    assert_eq!(alice_group.member_count(), 1);
}

#[test]
fn stale_and_replayed_commits_are_epoch_errors() {
    let ds = Observer::new(
        "livekit-mls-ds",
        SignatureKeyPair::generate(1).unwrap(),
        None,
    )
    .unwrap();
    let alice = client("alice");
    let mut group = alice
        .create_group(b"room", &[ds.signing_identity().unwrap()])
        .unwrap();
    let mut observed = ds.observe(&group.group_info(true).unwrap()).unwrap();
    let first = group.commit(&[], &[]).unwrap();
    observed.process_message(&first.commit).unwrap();
    let err = observed.process_message(&first.commit).err().unwrap();
    assert_eq!(err.kind, ErrorKind::Epoch);
}

#[test]
fn a_group_info_describes_only_the_epoch_its_commit_creates() {
    let ds = Observer::new(
        "livekit-mls-ds",
        SignatureKeyPair::generate(1).unwrap(),
        None,
    )
    .unwrap();
    let mut group = client("alice")
        .create_group(b"room", &[ds.signing_identity().unwrap()])
        .unwrap();
    let mut observed = ds.observe(&group.group_info(true).unwrap()).unwrap();
    let previous = group.group_info(true).unwrap();
    let rival = group.commit(&[], &[]).unwrap();
    group.discard_pending_commit();
    let output = group.commit(&[], &[]).unwrap();
    observed.process_message(&output.commit).unwrap();
    assert!(observed.describes(&output.group_info.unwrap()).unwrap());
    assert!(!observed.describes(&previous).unwrap());
    assert!(!observed.describes(&rival.group_info.unwrap()).unwrap());
    let err = observed.describes(&output.commit).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Decode);
}

#[test]
fn state_round_trips_and_belongs_to_its_identity() {
    let alice = client("alice");
    let mut group = alice.create_group(b"room", &[]).unwrap();
    let state = group.to_bytes().unwrap();
    let restored = alice.load_group(&state).unwrap();
    assert_eq!(secret(&restored, "x"), secret(&group, "x"));
    let err = client("eve").load_group(&state).err().unwrap();
    assert_eq!(err.kind, ErrorKind::State);
}
