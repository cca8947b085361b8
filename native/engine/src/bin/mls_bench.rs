//! Times the engine's core operations in plain Rust, for comparison with the same
//! operations driven from Python (`benchmarks/bench_native.py` runs both).
//!
//! Usage: `mls-bench <members> <iterations>` — prints one JSON object per operation:
//! `{"op": "...", "members": N, "samples_us": [...]}`.
//!
//! Scenario per group size N (identical in the Python benchmark):
//! * the creator adds N-1 members in one commit; member "m1" joins from the Welcome;
//! * `commit_add`: the creator commits one Add (then discards it);
//! * `commit_remove`: the creator commits one Remove of the last leaf (then discards it);
//! * `process_commit`: "m1" processes that Remove commit (state restored before each run);
//! * `join_welcome`: a new client joins from a Welcome adding it to the N-member group.

use std::time::Instant;

use mls_engine::{Client, Group, SignatureKeyPair};

fn client(name: &str) -> Client {
    Client::new(name, SignatureKeyPair::generate(1).expect("keygen")).expect("client")
}

fn micros(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e6
}

fn emit(op: &str, members: usize, samples: &[f64]) {
    let list = samples
        .iter()
        .map(|s| format!("{s:.1}"))
        .collect::<Vec<_>>()
        .join(",");
    println!("{{\"op\": \"{op}\", \"members\": {members}, \"samples_us\": [{list}]}}");
}

fn build_group(members: usize) -> (Group, Client, Vec<u8>) {
    let creator = client("m0");
    let mut group = creator.create_group(b"bench", &[]).expect("create");
    let others: Vec<Client> = (1..members).map(|i| client(&format!("m{i}"))).collect();
    let key_packages: Vec<Vec<u8>> = others
        .iter()
        .map(|c| c.generate_key_package().expect("kp"))
        .collect();
    let output = group.commit(&key_packages, &[]).expect("bulk add");
    group.apply_pending_commit().expect("apply");
    let receiver_client = others.into_iter().next().expect("at least two members");
    let mut receiver = receiver_client
        .join_group(output.welcome.as_deref().expect("welcome"))
        .expect("join");
    let receiver_state = receiver.to_bytes().expect("state");
    (group, receiver_client, receiver_state)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let members: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
    let iterations: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20);
    assert!(members >= 3, "need at least 3 members");

    let (mut group, receiver_client, receiver_state) = build_group(members);
    let last_leaf = u32::try_from(members - 1).expect("members fit in u32");

    let mut samples = Vec::with_capacity(iterations);
    for i in 0..iterations {
        let kp = client(&format!("new{i}"))
            .generate_key_package()
            .expect("kp");
        let start = Instant::now();
        group.commit(&[kp], &[]).expect("commit add");
        samples.push(micros(start));
        group.discard_pending_commit();
    }
    emit("commit_add", members, &samples);

    samples.clear();
    let mut remove_commit = Vec::new();
    for _ in 0..iterations {
        let start = Instant::now();
        let output = group.commit(&[], &[last_leaf]).expect("commit remove");
        samples.push(micros(start));
        remove_commit = output.commit;
        group.discard_pending_commit();
    }
    emit("commit_remove", members, &samples);

    samples.clear();
    for _ in 0..iterations {
        let mut receiver = receiver_client.load_group(&receiver_state).expect("load");
        let start = Instant::now();
        receiver.process_message(&remove_commit).expect("process");
        samples.push(micros(start));
    }
    emit("process_commit", members, &samples);

    samples.clear();
    for i in 0..iterations {
        let joiner = client(&format!("joiner{i}"));
        let kp = joiner.generate_key_package().expect("kp");
        let output = group.commit(&[kp], &[]).expect("commit add");
        group.discard_pending_commit();
        let welcome = output.welcome.expect("welcome");
        let start = Instant::now();
        joiner.join_group(&welcome).expect("join");
        samples.push(micros(start));
    }
    emit("join_welcome", members, &samples);
}
