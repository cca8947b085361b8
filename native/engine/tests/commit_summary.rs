//! What a commit summary says must not depend on who reads it: the member it removes, the
//! members that stay and the delivery service's observer agree on who was added (and at
//! which leaf), who was removed, and whether the commit carried an UpdatePath — in every
//! combination of a self-removal with other Adds and Removes.

mod common;

use common::{client, commit_of};
use mls_engine::{Client, ClientOptions, Group, ObservedGroup, Observer, SignatureKeyPair};

/// alice (the committer), then bob, carol, dave, erin at leaves 1..=4, all added through
/// DS proposals; every group and the observer at the same epoch.
struct Room {
    observed: ObservedGroup,
    groups: Vec<(String, Group)>,
}

impl Room {
    fn new() -> Self {
        let ds = Observer::new(
            "livekit-mls-ds",
            SignatureKeyPair::generate(1).unwrap(),
            None,
        )
        .unwrap();
        let alice = client("alice");
        let alice_group = alice
            .create_group(b"room", &[ds.signing_identity().unwrap()])
            .unwrap();
        let observed = ds.observe(&alice_group.group_info(true).unwrap()).unwrap();
        let mut room = Room {
            observed,
            groups: vec![("alice".to_owned(), alice_group)],
        };
        for name in ["bob", "carol", "dave", "erin"] {
            let joiner = client(name);
            let (proposal, _) = room
                .observed
                .propose_add(&joiner.generate_key_package().unwrap())
                .unwrap();
            let welcome = room.commit(&[proposal]).welcome.unwrap();
            let group = joiner.join_group(&welcome).unwrap();
            room.groups.push((name.to_owned(), group));
        }
        room
    }

    /// alice commits the DS proposals; every member and the observer process it.
    fn commit(&mut self, proposals: &[Vec<u8>]) -> mls_engine::CommitOutput {
        for (_, group) in self.groups.iter_mut() {
            for proposal in proposals {
                group.process_message(proposal).unwrap();
            }
        }
        let output = self.groups[0].1.commit(&[], &[]).unwrap();
        commit_of(self.observed.process_message(&output.commit).unwrap());
        self.groups[0].1.apply_pending_commit().unwrap();
        for (_, group) in self.groups.iter_mut().skip(1) {
            commit_of(group.process_message(&output.commit).unwrap());
        }
        output
    }

    fn leaf(&self, name: &str) -> u32 {
        self.observed.member_index(name).unwrap()
    }
}

fn names(members: &[mls_engine::Member]) -> Vec<(String, u32)> {
    members
        .iter()
        .map(|m| (m.identity.clone(), m.leaf_index))
        .collect()
}

/// One commit by alice that removes `victim`, also removes `others` and adds `joiners`;
/// checks what the victim, a staying member and the observer each report.
fn removal_with(victim: &str, others: &[&str], joiners: &[&str]) {
    let mut room = Room::new();
    let mut proposals = Vec::new();
    for name in std::iter::once(&victim).chain(others) {
        let leaf = room.leaf(name);
        proposals.push(room.observed.propose_remove(leaf).unwrap().0);
    }
    for name in joiners {
        let kp = client(name).generate_key_package().unwrap();
        proposals.push(room.observed.propose_add(&kp).unwrap().0);
    }
    for (_, group) in room.groups.iter_mut() {
        for proposal in &proposals {
            group.process_message(proposal).unwrap();
        }
    }
    let output = room.groups[0].1.commit(&[], &[]).unwrap();
    let by_observer = commit_of(room.observed.process_message(&output.commit).unwrap());
    let by_committer = room.groups[0].1.apply_pending_commit().unwrap();
    let mut by_victim = None;
    let mut by_stayer = None;
    for (name, group) in room.groups.iter_mut().skip(1) {
        if others.contains(&name.as_str()) {
            continue;
        }
        let applied = commit_of(group.process_message(&output.commit).unwrap());
        if name == victim {
            assert!(group.is_removed());
            by_victim = Some(applied);
        } else {
            by_stayer = Some(applied);
        }
    }
    let (by_victim, by_stayer) = (by_victim.unwrap(), by_stayer.unwrap());

    let case = format!("remove {victim} + {others:?}, add {joiners:?}");
    assert!(
        by_victim.self_removed,
        "{case}: the victim must see itself removed"
    );
    assert!(
        !by_stayer.self_removed && !by_observer.self_removed,
        "{case}"
    );
    for summary in [&by_victim, &by_stayer, &by_committer] {
        assert_eq!(
            names(&summary.added),
            names(&by_observer.added),
            "{case}: added"
        );
        assert_eq!(
            names(&summary.removed),
            names(&by_observer.removed),
            "{case}: removed"
        );
        assert_eq!(summary.epoch, by_observer.epoch, "{case}: epoch");
        assert_eq!(
            summary.proposal_refs, by_observer.proposal_refs,
            "{case}: refs"
        );
        assert!(summary.has_path, "{case}: every commit carries a path");
    }
    let mut added: Vec<_> = by_observer
        .added
        .iter()
        .map(|m| m.identity.as_str())
        .collect();
    added.sort_unstable();
    assert_eq!(added, joiners, "{case}");
    let mut removed: Vec<_> = by_observer
        .removed
        .iter()
        .map(|m| m.identity.as_str())
        .collect();
    removed.sort_unstable();
    let mut expected: Vec<_> = std::iter::once(victim)
        .chain(others.iter().copied())
        .collect();
    expected.sort_unstable();
    assert_eq!(removed, expected, "{case}");
    // the leaves the victim worked out are the ones the new tree really has
    for member in &by_victim.added {
        assert_eq!(
            room.observed.member_index(&member.identity),
            Some(member.leaf_index)
        );
    }
}

#[test]
fn a_removed_member_reads_the_same_summary_as_everyone_else() {
    for victim in ["carol", "erin"] {
        // erin holds the last leaf: removing her truncates the tree before the Adds
        for others in [&[][..], &["bob"][..], &["dave"][..]] {
            if others.contains(&victim) {
                continue;
            }
            for joiners in [&[][..], &["frank"][..], &["frank", "grace", "heidi"][..]] {
                removal_with(victim, others, joiners);
            }
        }
    }
}

#[test]
fn an_update_only_commit_is_summarised_alike() {
    let mut room = Room::new();
    let output = room.groups[0].1.commit(&[], &[]).unwrap();
    let by_observer = commit_of(room.observed.process_message(&output.commit).unwrap());
    let by_bob = commit_of(room.groups[1].1.process_message(&output.commit).unwrap());
    assert!(by_observer.added.is_empty() && by_observer.removed.is_empty());
    assert_eq!(names(&by_bob.added), names(&by_observer.added));
    assert!(!by_bob.self_removed);
    assert!(by_observer.has_path && by_bob.has_path);
}

#[test]
fn the_observer_sees_whether_a_commit_carries_a_path() {
    let ds = Observer::new(
        "livekit-mls-ds",
        SignatureKeyPair::generate(1).unwrap(),
        None,
    )
    .unwrap();
    let options = ClientOptions {
        require_update_path: false,
        ..ClientOptions::default()
    };
    let lax =
        Client::with_options("alice", SignatureKeyPair::generate(1).unwrap(), options).unwrap();
    let mut alice = lax
        .create_group(b"room", &[ds.signing_identity().unwrap()])
        .unwrap();
    let mut observed = ds.observe(&alice.group_info(true).unwrap()).unwrap();

    // an add-only commit by a client that does not require paths: RFC-valid, no path
    let (proposal, _) = observed
        .propose_add(&client("bob").generate_key_package().unwrap())
        .unwrap();
    alice.process_message(&proposal).unwrap();
    let output = alice.commit(&[], &[]).unwrap();
    let seen = commit_of(observed.process_message(&output.commit).unwrap());
    assert!(!seen.has_path);
    assert!(!alice.apply_pending_commit().unwrap().has_path);

    // a removal always needs a path (RFC 9420 §12.4), whatever the client's rule
    let (proposal, _) = observed.propose_remove(1).unwrap();
    alice.process_message(&proposal).unwrap();
    let output = alice.commit(&[], &[]).unwrap();
    assert!(commit_of(observed.process_message(&output.commit).unwrap()).has_path);
    assert!(alice.apply_pending_commit().unwrap().has_path);
}
