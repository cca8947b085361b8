//! Input from the network never panics the engine: every entry point that parses bytes
//! gets random and mutated inputs and must answer with an error (or a valid result).
//! A panic fails this test. (The Python suite runs the same idea through the binding with
//! 10,000 inputs per entry point: tests/test_mls_fuzz.py.)

use mls_engine::{message_info, Client, Group, Observer, SignatureKeyPair};

/// A small deterministic generator (xorshift), so failures are reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }

    fn mutate(&mut self, base: &[u8]) -> Vec<u8> {
        let mut data = base.to_vec();
        if data.is_empty() {
            return self.bytes(16);
        }
        match self.below(5) {
            0 => {
                let i = self.below(data.len());
                data[i] ^= 1 << self.below(8);
            }
            1 => data.truncate(self.below(data.len())),
            2 => {
                let len = 1 + self.below(32);
                let extra = self.bytes(len);
                data.extend(extra);
            }
            3 => {
                let i = self.below(data.len());
                data[i] = 0xff;
            }
            _ => {
                let len = self.below(256);
                return self.bytes(len);
            }
        }
        data
    }
}

struct Corpus {
    bob: Client,
    group: Group,
    observer: Observer,
    samples: Vec<Vec<u8>>,
}

fn corpus() -> Corpus {
    let observer = Observer::new("ds", SignatureKeyPair::generate(1).unwrap(), None).unwrap();
    let alice = Client::new("alice", SignatureKeyPair::generate(1).unwrap()).unwrap();
    let bob = Client::new("bob", SignatureKeyPair::generate(1).unwrap()).unwrap();
    let mut group = alice
        .create_group(b"fuzz", &[observer.signing_identity().unwrap()])
        .unwrap();
    let key_package = bob.generate_key_package().unwrap();
    let output = group
        .commit(std::slice::from_ref(&key_package), &[])
        .unwrap();
    group.apply_pending_commit().unwrap();
    let samples = vec![
        key_package,
        output.commit,
        output.welcome.unwrap(),
        output.group_info.unwrap(),
        group.to_bytes().unwrap(),
        observer.signing_identity().unwrap(),
    ];
    Corpus {
        bob,
        group,
        observer,
        samples,
    }
}

#[test]
fn garbage_never_panics() {
    let mut corpus = corpus();
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    let epoch = corpus.group.epoch();
    for _ in 0..3000 {
        let base = corpus.samples[rng.below(corpus.samples.len())].clone();
        let input = rng.mutate(&base);
        let _ = message_info(&input);
        let _ = SignatureKeyPair::from_secret(1, &input);
        let _ = corpus.bob.join_group(&input);
        let _ = corpus.bob.join_by_external_commit(&input, None);
        let _ = corpus.bob.load_group(&input);
        let _ = corpus.observer.observe(&input);
        let _ = corpus.observer.load(&input);
        let _ = corpus.observer.validate_key_package(&input);
        if corpus
            .group
            .commit(std::slice::from_ref(&input), &[])
            .is_ok()
        {
            corpus.group.discard_pending_commit();
        }
        let _ = corpus.group.process_message(&input);
        assert_eq!(
            corpus.group.epoch(),
            epoch,
            "a mutated message moved the group"
        );
    }
}
