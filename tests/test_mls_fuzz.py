"""Property test: malformed bytes never crash the engine and never change state.

Every entry point that parses bytes gets ``LIVEKIT_MLS_FUZZ_CASES`` (default 10,000)
inputs: random strings and mutations (bit flips, truncations, insertions, splices, large
length prefixes) of genuine MLS messages. The only acceptable outcomes are a typed
exception (``MlsError`` subclass, or ``ValueError``) with the object unchanged, or, rarely,
a mutation that is still a valid message. A panic inside Rust would surface as
``InternalError`` with code "Panic" and fails the test; a crash would kill pytest.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from mls_provider import mls

CASES = int(os.environ.get("LIVEKIT_MLS_FUZZ_CASES", "10000"))
LABEL = b"fuzz"


@dataclass
class Corpus:
    """Genuine messages of every kind, from one small live group."""

    observer: mls.ExternalObserver
    alice: mls.MlsClient
    bob: mls.MlsClient
    group: mls.Group
    observed: mls.ObservedGroup
    samples: list[bytes]


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    observer = mls.ExternalObserver("ds", mls.SignatureKeyPair.generate())
    alice = mls.MlsClient("alice", mls.SignatureKeyPair.generate())
    bob = mls.MlsClient("bob", mls.SignatureKeyPair.generate())
    carol = mls.MlsClient("carol", mls.SignatureKeyPair.generate())
    group = alice.create_group(b"fuzz-room", [observer.signing_identity()])
    observed = observer.observe(group.group_info())
    kp_bob = bob.generate_key_package()
    output = group.commit(add=[kp_bob])
    observed.process_message(output.commit)
    group.apply_pending_commit()
    assert output.welcome is not None and output.group_info is not None
    bob_group = bob.join_group(output.welcome)
    proposal, _ = observed.propose_add(carol.generate_key_package())
    group.process_message(proposal)
    bob_group.process_message(proposal)
    # messages for the *current* epoch, so mutations reach deep validation
    next_commit = bob_group.commit()
    bob_group.discard_pending_commit()
    samples = [
        kp_bob,
        output.commit,
        output.welcome,
        output.group_info,
        proposal,
        next_commit.commit,
        next_commit.welcome or b"",
        group.to_bytes(),
        observed.snapshot(),
        observer.signing_identity(),
        alice.key_pair.secret_key,
    ]
    return Corpus(observer, alice, bob, group, observed, samples)


def mutations(rng: random.Random, samples: list[bytes], count: int) -> Iterator[bytes]:
    """``count`` inputs, none of them equal to a genuine sample."""
    genuine = set(samples)
    produced = 0
    while produced < count:
        data = mutate(rng, samples)
        if data not in genuine:
            produced += 1
            yield data


def mutate(rng: random.Random, samples: list[bytes]) -> bytes:
    choice = rng.randrange(9)
    base = bytearray(rng.choice(samples))
    if choice == 0 or not base:
        return rng.randbytes(rng.randrange(0, 512))
    if choice == 1:  # flip a few bits
        for _ in range(rng.randrange(1, 4)):
            base[rng.randrange(len(base))] ^= 1 << rng.randrange(8)
    elif choice == 2:  # overwrite a byte
        base[rng.randrange(len(base))] = rng.randrange(256)
    elif choice == 3:  # truncate
        del base[rng.randrange(len(base)) :]
    elif choice == 4:  # append garbage
        base += rng.randbytes(rng.randrange(1, 64))
    elif choice == 5:  # insert a byte
        base.insert(rng.randrange(len(base)), rng.randrange(256))
    elif choice == 6:  # delete a range
        start = rng.randrange(len(base))
        del base[start : start + rng.randrange(1, 16)]
    elif choice == 7:  # splice two genuine messages
        other = rng.choice(samples)
        cut = rng.randrange(len(base))
        base = base[:cut] + other[rng.randrange(len(other) + 1) :]
    else:  # a huge varint / length prefix somewhere
        pos = rng.randrange(len(base))
        base[pos : pos + 4] = rng.choice([b"\xff\xff\xff\xff", b"\xbf\xff\xff\xff", b"\x7f"])
    return bytes(base)


def check(entry: Callable[[bytes], object], inputs: Iterator[bytes]) -> int:
    """Runs ``entry`` on every input; returns how many inputs were accepted."""
    accepted = 0
    for data in inputs:
        try:
            entry(data)
        except mls.InternalError as e:  # a panic or provider failure is a bug
            pytest.fail(f"InternalError ({e.code}) on input {data.hex()[:200]}: {e}")
        except (mls.MlsError, ValueError):
            continue
        accepted += 1
    return accepted


ENTRY_POINTS = [
    "message_info",
    "key_pair_from_secret",
    "join_group",
    "join_by_external_commit",
    "load_group",
    "create_group_external_sender",
    "observe",
    "observer_load",
    "validate_key_package",
    "observed_describes",
]


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_stateless_entry_points_survive_garbage(corpus: Corpus, entry_point: str) -> None:
    rng = random.Random(f"stateless-{entry_point}")
    entries: dict[str, Callable[[bytes], object]] = {
        "message_info": mls.message_info,
        "key_pair_from_secret": mls.SignatureKeyPair.from_secret,
        "join_group": corpus.bob.join_group,
        "join_by_external_commit": corpus.bob.join_by_external_commit,
        "load_group": corpus.alice.load_group,
        "create_group_external_sender": lambda b: corpus.alice.create_group(b"g", [b]),
        "observe": corpus.observer.observe,
        "observer_load": corpus.observer.load,
        "validate_key_package": corpus.observer.validate_key_package,
        "observed_describes": corpus.observed.describes,
    }
    check(entries[entry_point], mutations(rng, corpus.samples, CASES))


def test_member_process_message_survives_garbage_without_state_change(corpus: Corpus) -> None:
    rng = random.Random("member-process")
    group = corpus.group
    epoch, secret = group.epoch, group.export_secret(LABEL, b"", 32)
    pending = group.pending_proposal_count

    def entry(data: bytes) -> None:
        try:
            result = group.process_message(data)
        finally:
            assert (group.epoch, group.pending_proposal_count) == (epoch, pending)
            assert group.export_secret(LABEL, b"", 32) == secret
        # Handshakes of this epoch were processed already, so only messages that change
        # nothing (a still-valid Welcome or GroupInfo) may be accepted.
        assert isinstance(result, mls.OtherMessage), result

    check(entry, mutations(rng, corpus.samples, CASES))


def test_member_commit_rejects_bad_key_packages_without_pending_commit(corpus: Corpus) -> None:
    rng = random.Random("member-commit")
    group = corpus.group
    epoch = group.epoch

    def entry(data: bytes) -> None:
        try:
            group.commit(add=[data])
        except (mls.MlsError, ValueError):
            assert not group.has_pending_commit and group.epoch == epoch
            raise
        group.discard_pending_commit()  # a mutation that is still a valid key package

    check(entry, mutations(rng, corpus.samples, CASES))


def test_observer_process_and_propose_survive_garbage_without_state_change(
    corpus: Corpus,
) -> None:
    rng = random.Random("observer")
    observed = corpus.observed
    snapshot = observed.snapshot()

    def process(data: bytes) -> None:
        nonlocal observed
        try:
            observed.process_message(data)
        except (mls.MlsError, ValueError):
            assert observed.snapshot() == snapshot
            raise
        # The observer cannot check membership tags, so a commit mutated only there is
        # accepted, exactly as the genuine one would be. Start again from the snapshot.
        observed = corpus.observer.load(snapshot)

    def propose(data: bytes) -> None:
        refs = observed.pending_proposal_refs()
        try:
            observed.propose_add(data)
        except (mls.MlsError, ValueError):
            assert observed.pending_proposal_refs() == refs
            raise
        observed.clear_proposals()

    check(process, mutations(rng, corpus.samples, CASES))
    observed = corpus.observer.load(snapshot)
    check(propose, mutations(rng, corpus.samples, CASES // 2))
