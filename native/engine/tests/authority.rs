//! Authority mode: members (and the DS's observer) accept only credentials the app's
//! identity authority signed for the leaf's signature key, for the room, valid now —
//! wherever a credential appears: key packages, Adds, commits, Welcomes.

mod common;

use common::commit_of;
use mls_engine::credential::{now_seconds, signed_bytes};
use mls_engine::{
    Authority, AuthorityCredential, Client, ClientOptions, ErrorKind, Group, ObservedGroup,
    Observer, SignatureKeyPair,
};

const ROOM: &str = "room-1";

struct App {
    authority: SignatureKeyPair,
    ds: Observer,
}

impl App {
    fn new() -> Self {
        let authority = SignatureKeyPair::generate(1).unwrap();
        let pinned = Authority::new(vec![authority.public_key().to_vec()], None).unwrap();
        let ds = Observer::new(
            "livekit-mls-ds",
            SignatureKeyPair::generate(1).unwrap(),
            Some(pinned),
        )
        .unwrap();
        Self { authority, ds }
    }

    fn pinned(&self) -> Authority {
        Authority::new(
            vec![self.authority.public_key().to_vec()],
            Some(ROOM.into()),
        )
        .unwrap()
    }

    /// A credential body signed by `by` for `key`.
    fn credential(
        by: &SignatureKeyPair,
        key: &SignatureKeyPair,
        identity: &str,
        room: &str,
        not_before: u64,
        not_after: u64,
    ) -> Vec<u8> {
        let signed = signed_bytes(key.public_key(), identity, room, not_before, not_after).unwrap();
        AuthorityCredential {
            identity: identity.into(),
            room: room.into(),
            not_before,
            not_after,
            signature: by.sign(&signed).unwrap(),
        }
        .encode()
        .unwrap()
    }

    /// A member with a good credential, pinning the authority (or, `lax`, checking
    /// nothing: a compromised member's client).
    fn member(&self, identity: &str, lax: bool) -> Client {
        let key = SignatureKeyPair::generate(1).unwrap();
        let now = now_seconds();
        let credential =
            Self::credential(&self.authority, &key, identity, ROOM, now - 60, now + 3600);
        let authority = if lax { None } else { Some(self.pinned()) };
        self.client(identity, key, Some(credential), authority)
    }

    fn client(
        &self,
        identity: &str,
        key: SignatureKeyPair,
        credential: Option<Vec<u8>>,
        authority: Option<Authority>,
    ) -> Client {
        let options = ClientOptions {
            credential,
            authority,
            require_update_path: true,
        };
        Client::with_options(identity, key, options).unwrap()
    }

    /// Key packages of intruders, each refused for its own reason (built by clients that
    /// do not check anything themselves).
    fn intruders(&self) -> Vec<(&'static str, Vec<u8>)> {
        let now = now_seconds();
        let other_authority = SignatureKeyPair::generate(1).unwrap();
        let mut out = Vec::new();
        let mut add = |reason: &'static str,
                       signer: &SignatureKeyPair,
                       room: &str,
                       nb: u64,
                       na: u64,
                       stolen: bool| {
            let key = SignatureKeyPair::generate(1).unwrap();
            let vouched_for = if stolen {
                SignatureKeyPair::generate(1).unwrap()
            } else {
                key.clone()
            };
            let credential = Self::credential(signer, &vouched_for, "mallory", room, nb, na);
            let client = self.client("mallory", key, Some(credential), None);
            out.push((reason, client.generate_key_package().unwrap()));
        };
        add(
            "other authority",
            &other_authority,
            ROOM,
            now - 60,
            now + 3600,
            false,
        );
        add(
            "expired",
            &self.authority,
            ROOM,
            now - 7200,
            now - 3600,
            false,
        );
        add(
            "not yet valid",
            &self.authority,
            ROOM,
            now + 3600,
            now + 7200,
            false,
        );
        add(
            "stolen (another key)",
            &self.authority,
            ROOM,
            now - 60,
            now + 3600,
            true,
        );
        let basic = self.client(
            "mallory",
            SignatureKeyPair::generate(1).unwrap(),
            None,
            None,
        );
        out.push(("basic credential", basic.generate_key_package().unwrap()));
        out
    }
}

fn secret(group: &Group, identity: &str) -> Vec<u8> {
    group
        .export_secret(b"livekit-mls v1 sender key", identity.as_bytes(), 32)
        .unwrap()
}

/// alice creates the group; bob and carol (whose client checks nothing if `lax_carol`)
/// join through DS proposals.
fn room(app: &App, lax_carol: bool) -> (Vec<(String, Group)>, ObservedGroup) {
    let alice = app.member("alice", false);
    let mut alice_group = alice
        .create_group(b"room", &[app.ds.signing_identity().unwrap()])
        .unwrap();
    let mut observed = app
        .ds
        .observe(&alice_group.group_info(true).unwrap())
        .unwrap();
    let mut groups = Vec::new();
    for name in ["bob", "carol"] {
        let client = app.member(name, lax_carol && name == "carol");
        let kp = client.generate_key_package().unwrap();
        app.ds.validate_key_package(&kp).unwrap();
        let (proposal, _) = observed.propose_add(&kp).unwrap();
        alice_group.process_message(&proposal).unwrap();
        for (_, g) in groups.iter_mut() {
            let g: &mut Group = g;
            g.process_message(&proposal).unwrap();
        }
        let output = alice_group.commit(&[], &[]).unwrap();
        commit_of(observed.process_message(&output.commit).unwrap());
        alice_group.apply_pending_commit().unwrap();
        for (_, g) in groups.iter_mut() {
            let g: &mut Group = g;
            g.process_message(&output.commit).unwrap();
        }
        groups.push((
            name.to_owned(),
            client.join_group(&output.welcome.unwrap()).unwrap(),
        ));
    }
    groups.insert(0, ("alice".to_owned(), alice_group));
    (groups, observed)
}

#[test]
fn vouched_members_form_a_group_and_agree_on_keys() {
    let app = App::new();
    let (groups, observed) = room(&app, false);
    assert_eq!(observed.members().unwrap().len(), 3);
    for (_, g) in &groups {
        assert_eq!(secret(g, "bob"), secret(&groups[0].1, "bob"));
        assert!(g.members().unwrap().iter().all(|m| m.not_after.is_some()));
    }
}

#[test]
fn the_ds_refuses_unvouched_key_packages_with_the_reason() {
    let app = App::new();
    for (reason, kp) in app.intruders() {
        let err = app.ds.validate_key_package(&kp).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Validation, "{reason}: {err}");
        assert!(
            ["CredentialRejected", "UnsupportedCredential"].contains(&err.code.as_str()),
            "{reason}: {err}"
        );
    }
}

#[test]
fn an_unvouched_add_is_neither_committed_nor_accepted_by_value() {
    let app = App::new();
    let (mut groups, _) = room(&app, true);
    for (reason, kp) in app.intruders() {
        // an honest committer cannot commit it
        let err = groups[0]
            .1
            .commit(std::slice::from_ref(&kp), &[])
            .err()
            .unwrap();
        assert_eq!(err.code, "CredentialRejected", "{reason}: {err}");
        // carol's client checks nothing (a compromised member): her commit adds it by
        // value; alice and bob refuse to apply it
        let output = groups[2].1.commit(&[kp], &[]).unwrap();
        groups[2].1.discard_pending_commit();
        for i in [0, 1] {
            let err = groups[i].1.process_message(&output.commit).err().unwrap();
            assert_eq!(err.code, "CredentialRejected", "{reason}: {err}");
        }
    }
    // the group is unchanged and still works
    let output = groups[0].1.commit(&[], &[]).unwrap();
    groups[0].1.apply_pending_commit().unwrap();
    for (_, g) in groups.iter_mut().skip(1) {
        g.process_message(&output.commit).unwrap();
    }
    assert_eq!(secret(&groups[0].1, "carol"), secret(&groups[2].1, "carol"));
}

#[test]
fn a_welcome_holding_an_unvouched_member_is_refused() {
    let app = App::new();
    let now = now_seconds();
    // a group built by clients that check nothing, holding an intruder, then dave invited
    let lax = |name: &str, signer: &SignatureKeyPair| {
        let key = SignatureKeyPair::generate(1).unwrap();
        let credential = App::credential(signer, &key, name, ROOM, now - 60, now + 3600);
        app.client(name, key, Some(credential), None)
    };
    let other = SignatureKeyPair::generate(1).unwrap();
    let alice = lax("alice", &app.authority);
    let mallory = lax("mallory", &other);
    let mut group = alice.create_group(b"room", &[]).unwrap();
    let out = group
        .commit(&[mallory.generate_key_package().unwrap()], &[])
        .unwrap();
    group.apply_pending_commit().unwrap();
    drop(out);
    let dave = app.member("dave", false);
    let out = group
        .commit(&[dave.generate_key_package().unwrap()], &[])
        .unwrap();
    let err = dave.join_group(&out.welcome.unwrap()).err().unwrap();
    assert_eq!(err.code, "CredentialRejected", "{err}");
    assert!(err.message.contains("mallory"), "{err}");
}

#[test]
fn a_member_renews_its_credential_but_cannot_change_identity() {
    let app = App::new();
    let (mut groups, mut observed) = room(&app, false);
    let now = now_seconds();
    // bob renews: a new key and a credential valid for longer
    let key = SignatureKeyPair::generate(1).unwrap();
    let renewed = App::credential(&app.authority, &key, "bob", ROOM, now - 60, now + 7200);
    let output = groups[1].1.commit_renewal(&key, &renewed).unwrap();
    commit_of(observed.process_message(&output.commit).unwrap());
    groups[1].1.apply_pending_commit().unwrap();
    for i in [0, 2] {
        groups[i].1.process_message(&output.commit).unwrap();
    }
    let bob = groups[0]
        .1
        .members()
        .unwrap()
        .into_iter()
        .find(|m| m.identity == "bob")
        .unwrap();
    assert_eq!(bob.not_after, Some(now + 7200));
    assert_eq!(bob.signature_key, key.public_key());
    // a credential of another identity is not a renewal
    let key = SignatureKeyPair::generate(1).unwrap();
    let boss = App::credential(&app.authority, &key, "boss", ROOM, now - 60, now + 7200);
    assert!(groups[1].1.commit_renewal(&key, &boss).is_err());
}

#[test]
fn an_own_credential_that_would_be_refused_is_refused_at_once() {
    let app = App::new();
    let now = now_seconds();
    let key = SignatureKeyPair::generate(1).unwrap();
    let credential = App::credential(&app.authority, &key, "bob", "room-2", now - 60, now + 3600);
    let options = ClientOptions {
        credential: Some(credential),
        authority: Some(app.pinned()),
        require_update_path: true,
    };
    let err = Client::with_options("bob", key, options).err().unwrap();
    assert_eq!(err.code, "CredentialRejected");
    assert!(err.message.contains("room-2"), "{err}");
}
