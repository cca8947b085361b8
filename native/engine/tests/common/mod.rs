//! Helpers shared by the engine's integration tests (each test crate uses some of them).

#![allow(dead_code)]

use mls_engine::{Client, CommitApplied, Received, SignatureKeyPair};

/// A client of `name` with a fresh suite-1 key pair.
pub fn client(name: &str) -> Client {
    Client::new(name, SignatureKeyPair::generate(1).unwrap()).unwrap()
}

/// The commit summary of a processed message, which must be a commit.
pub fn commit_of(received: Received) -> CommitApplied {
    match received {
        Received::Commit(c) => c,
        other => panic!("expected a commit, got {other:?}"),
    }
}
