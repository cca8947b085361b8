"""The ordering rules of one room: exactly one commit per epoch, membership that follows
the LiveKit room, and prepare -> ready -> execute transitions.

``CommitOrdering`` is pure logic over a :class:`RoomTx` (a room's state during one
operation): it validates a request, mutates the state, and emits log entries. It never
does I/O; :class:`delivery_service.rooms.RoomManager` runs it under the room's lock and
persists the result atomically (or drops it if anything raised).

Membership is *reconciled*: ``participants`` is who should be in the group (joined and not
left, with their newest key package), the observed roster is who is. After every change
the DS proposes the Adds and Removes that close the gap, and asks one member to commit
them all at once.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from delivery_service.errors import (
    EpochConflict,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    RateLimited,
)
from delivery_service.model import (
    CommitRecord,
    CommitRequestState,
    LogEntry,
    Participant,
    PendingProposal,
    Phase,
    RoomState,
    group_id_for,
)
from mls_provider import mls
from mls_provider.proto import delivery_pb2 as pb

ACCEPTED_COMMITS_KEPT = 16


@dataclass(frozen=True)
class OrderingConfig:
    """Room policy and deadlines (seconds). Documented in docs/protocol.md."""

    ring_size: int = 16
    cipher_suite: int = mls.DEFAULT_CIPHER_SUITE
    # the designated committer's deadline before any member may commit
    commit_timeout: float = 1.0
    # longest wait for ready acks before a transition executes anyway
    execute_timeout: float = 1.0
    # the named creator's deadline before another joiner is asked to create the group
    create_timeout: float = 5.0
    # Adds are batched: a commit is requested once no Add came for `batch_quiet`, or
    # `batch_max_wait` after the first pending Add. Removes are requested at once.
    batch_quiet: float = 0.035
    batch_max_wait: float = 0.5
    # During a burst (some pending Adds were held back while the previous commit ran) the
    # quiet window is longer, so a hiccup in the stream of joins does not cost an epoch.
    burst_quiet: float = 0.15
    # a member may commit without pending proposals (an update) once per this many seconds
    update_interval: float = 10.0
    # a committer whose commit independent members could not process may not join again
    # for this long
    blame_cooldown: float = 30.0
    # authority mode: the app's identity authority's public keys (handed to members in
    # the room config, who refuse a DS that checks other keys)
    authority_keys: tuple[bytes, ...] = ()
    # a credential must stay valid at least this long after Join (its holder renews it
    # before it expires; the DS removes a member whose credential expired)
    credential_margin: float = 600.0


KeyPackageLoader = Callable[[bytes], Awaitable[bytes | None]]


class RoomTx:
    """A room's state during one operation, and what the operation produced.

    The operation mutates ``state`` and ``observed`` in place; the caller persists them
    with ``entries`` and the key package changes atomically, or throws them all away
    (reloading from the store) if the operation raised.
    """

    def __init__(
        self,
        state: RoomState,
        observed: mls.ObservedGroup | None,
        now: float,
        key_packages: KeyPackageLoader,
        *,
        connected: frozenset[str] | None = None,
        absent: frozenset[str] = frozenset(),
        ready: set[str] | None = None,
    ) -> None:
        self.state = state
        self.observed = observed
        self.now = now
        # presence (soft state, from the members' streams): who is reachable now (None:
        # not tracked, everyone counts), and who has been gone past the presence timeout
        self.connected = connected
        self.absent = absent
        # the ready acks of the open transition, when the caller read them
        self.ready = ready
        self.start_head = state.head
        self.entries: list[LogEntry] = []
        # what was emitted, for metrics: (event kind, proposal kind or "")
        self.emitted: list[tuple[str, str]] = []
        self.put_key_packages: dict[bytes, bytes] = {}
        self.drop_key_packages: set[bytes] = set()
        self.state_changed = False
        self.observed_changed = False
        self._load_key_package = key_packages

    async def key_package(self, ref: bytes) -> bytes | None:
        if ref in self.put_key_packages:
            return self.put_key_packages[ref]
        return await self._load_key_package(ref)

    def emit(self, recipients: tuple[str, ...] | None = None, **event: object) -> int:
        """Appends one RoomEvent (``create_group=...``, ``commit=...``, ...) to the log."""
        self.state.head += 1
        message = pb.RoomEvent(seq=self.state.head, generation=self.state.generation, **event)  # type: ignore[arg-type]
        self.entries.append(LogEntry(self.state.head, message.SerializeToString(), recipients))
        ((kind, payload),) = event.items()
        self.emitted.append((kind, payload.kind if isinstance(payload, pb.Proposal) else ""))
        self.state_changed = True
        return self.state.head

    def changed(self) -> None:
        self.state_changed = True

    def reachable(self, identity: str) -> bool:
        return self.connected is None or identity in self.connected


class CommitOrdering:
    """The rules, parameterized by the DS's MLS identity and the room policy."""

    def __init__(self, observer: mls.ExternalObserver, config: OrderingConfig) -> None:
        self.observer = observer
        self.config = config
        self.ds_signing_identity = observer.signing_identity()

    def room_config(self, state: RoomState) -> pb.RoomConfig:
        return pb.RoomConfig(
            group_id=state.group_id,
            generation=state.generation,
            ring_size=self.config.ring_size,
            cipher_suite=self.config.cipher_suite,
            ds_signing_identity=self.ds_signing_identity,
            ds_public_key=self.observer.public_key,
            authority_keys=list(self.config.authority_keys),
        )

    # ---- requests ------------------------------------------------------------------

    async def join(self, tx: RoomTx, identity: str, key_package: bytes) -> pb.JoinResponse:
        """Registers (or replaces) the caller's key package and reconciles."""
        try:
            info = await asyncio.to_thread(self.observer.validate_key_package, key_package)
        except mls.MlsError as e:
            if getattr(e, "code", "") == "CredentialRejected":
                raise PermissionDenied(f"credential refused: {e}") from e
            raise InvalidRequest(f"invalid key package: {e}") from e
        if info.identity != identity:
            raise PermissionDenied(
                f"key package identity {info.identity!r} is not the token identity {identity!r}"
            )
        if info.room is not None and info.room != tx.state.room:
            raise PermissionDenied(
                f"the credential is for room {info.room!r}, not {tx.state.room!r}"
            )
        if self.config.authority_keys and (
            info.not_after is None or info.not_after < tx.now + self.config.credential_margin
        ):
            raise PermissionDenied(
                "the credential expires in less than "
                f"{self.config.credential_margin:g} s: issue one valid for longer"
            )
        if info.cipher_suite != self.config.cipher_suite:
            raise InvalidRequest(
                f"key package cipher suite {info.cipher_suite} is not the room's "
                f"{self.config.cipher_suite}"
            )
        state = tx.state
        until = state.cooldown.get(identity, 0.0)
        if until > tx.now:
            raise PermissionDenied(
                f"{identity!r} made a commit other members could not process; it may join "
                f"again in {until - tx.now:.0f} s"
            )
        previous = state.participants.get(identity)
        if previous is not None and previous.kp_ref == info.reference:
            # an idempotent retry of the same upload
            return pb.JoinResponse(config=self.room_config(state), cursor=tx.start_head)
        if previous is not None and not self._kp_in_use(state, previous):
            tx.drop_key_packages.add(previous.kp_ref)
        state.participants[identity] = Participant(identity, info.reference, tx.now)
        tx.put_key_packages[info.reference] = key_package
        tx.changed()
        cursor = tx.start_head
        if state.phase is Phase.CREATING and state.creator == identity:
            # the named creator joined again (e.g. after a failure report): its stream
            # starts at this cursor, after the CreateGroup naming it; name it once more
            self._request_creation(tx)
        await self._reconcile(tx)
        return pb.JoinResponse(config=self.room_config(state), cursor=cursor)

    async def create_group(
        self, tx: RoomTx, identity: str, generation: int, group_info: bytes
    ) -> int:
        state = tx.state
        digest = hashlib.sha256(group_info).hexdigest()
        if digest in state.accepted and state.generation == generation:
            return state.accepted[digest][0]  # an idempotent retry of an accepted creation
        if state.phase is not Phase.CREATING or state.generation != generation:
            raise EpochConflict(
                f"no group creation is pending for generation {generation}", state.epoch
            )
        if state.creator != identity:
            raise PermissionDenied(f"{identity!r} was not asked to create the group")
        try:
            observed = await asyncio.to_thread(self.observer.observe, group_info)
        except mls.MlsError as e:
            raise InvalidRequest(f"invalid group info: {e}") from e
        members = observed.members()
        if observed.group_id != state.group_id:
            raise InvalidRequest("group info is for another group id")
        if observed.epoch != 0 or [m.identity for m in members] != [identity]:
            raise InvalidRequest("a new group must be at epoch 0 with the creator as only member")
        if observed.cipher_suite != self.config.cipher_suite:
            raise InvalidRequest(f"the room's cipher suite is {self.config.cipher_suite}")
        if observed.external_senders() != [(self.observer.identity, self.observer.public_key)]:
            raise InvalidRequest("the group must list the delivery service as its external sender")
        participant = state.participants[identity]
        state.phase = Phase.ACTIVE
        state.creator = ""
        state.phase_since = tx.now
        state.epoch = 0
        state.executed_epoch = 0
        state.members = {identity: participant.kp_ref}
        state.group_info = group_info
        tx.drop_key_packages.add(participant.kp_ref)
        tx.observed = observed
        tx.observed_changed = True
        seq = tx.emit(execute=pb.TransitionExecute(epoch=0))
        self._remember_accepted(state, digest, seq, 0)
        await self._reconcile(tx)
        return seq

    async def submit_commit(
        self,
        tx: RoomTx,
        identity: str,
        epoch: int,
        commit: bytes,
        welcome: bytes,
        group_info: bytes,
    ) -> pb.SubmitCommitResponse:
        state = tx.state
        digest = hashlib.sha256(commit).hexdigest()
        if digest in state.accepted:  # an idempotent retry of an accepted commit
            seq, new_epoch = state.accepted[digest]
            return pb.SubmitCommitResponse(seq=seq, epoch=new_epoch)
        if state.phase is not Phase.ACTIVE or tx.observed is None:
            raise EpochConflict("the room has no group yet", state.epoch)
        if epoch != state.epoch:
            raise EpochConflict(f"stale commit: the room is at epoch {state.epoch}", state.epoch)
        if state.transition_open:
            raise EpochConflict(
                f"the transition to epoch {state.epoch} is still running; retry after it executes",
                state.epoch,
            )
        try:
            info = mls.message_info(commit)
        except mls.MlsError as e:
            raise InvalidRequest(f"commit is not an MLS message: {e}") from e
        if (info.wire_format, info.content_type) != ("public_message", "commit"):
            raise InvalidRequest("commit must be a commit in a PublicMessage")
        if info.group_id != state.group_id:
            raise InvalidRequest("the commit is for another group than the room's")
        if info.epoch != state.epoch:
            raise EpochConflict(
                f"stale commit: the room's group is at epoch {state.epoch}", state.epoch
            )
        before = tx.observed

        def apply_to_copy() -> tuple[mls.ObservedGroup, mls.Received]:
            # tried on a copy: kept only if the commit is accepted
            copy = before.copy()
            return copy, copy.process_message(commit)

        try:
            candidate, applied = await asyncio.to_thread(apply_to_copy)
        except mls.EpochError as e:
            raise EpochConflict(f"stale commit: {e}", state.epoch) from e
        except mls.MlsError as e:
            raise InvalidRequest(f"invalid commit: {e}") from e
        if not isinstance(applied, mls.CommitApplied):
            raise InvalidRequest("not a commit")
        if not applied.has_path:
            raise InvalidRequest(
                "commit carries no UpdatePath: livekit-mls requires one on every commit "
                "(path_required, docs/protocol.md §1)"
            )
        self._check_committer(state, before, applied, identity)
        request = state.commit_request
        if state.pending and not applied.is_external:
            # pending proposals are committed by the member the DS designated (anyone,
            # once every designee was passed over): another member's commit of them is
            # refused, so a hostile member cannot race the designee to commit them
            if request is None or request.epoch != state.epoch:
                raise EpochConflict(
                    f"no commit of epoch {state.epoch} is requested yet; wait for the "
                    "commit request",
                    state.epoch,
                )
            if request.committer and request.committer != identity:
                raise EpochConflict(
                    f"{request.committer!r} is designated to commit epoch {state.epoch}",
                    state.epoch,
                )
        if not state.pending and not applied.is_external:
            last = state.updates.get(identity)
            if last is not None and tx.now < last + self.config.update_interval:
                raise RateLimited(
                    "commits without pending proposals (updates) are limited to one per "
                    f"{self.config.update_interval:g} s per member; retry in "
                    f"{last + self.config.update_interval - tx.now:.1f} s"
                )
        missing = {p.ref for p in state.pending} - set(applied.proposal_refs)
        if missing:
            raise EpochConflict(
                f"commit misses {len(missing)} pending proposal(s) of epoch {state.epoch}; "
                "process the stream and commit again",
                state.epoch,
            )
        added = [m.identity for m in applied.added]
        removed = [m.identity for m in applied.removed]
        welcome_refs: list[bytes] = []
        if added and not applied.is_external:
            try:
                welcome_info = mls.message_info(welcome)
            except mls.MlsError as e:
                raise InvalidRequest(f"the commit adds members but welcome is invalid: {e}") from e
            if welcome_info.wire_format != "welcome":
                raise InvalidRequest("the commit adds members but carries no Welcome")
            added_refs = {p.kp_ref for p in state.pending if p.kind == "add"}
            welcome_refs = welcome_info.welcome_recipients
            if set(welcome_refs) != added_refs:
                raise InvalidRequest(
                    "the Welcome is not addressed to the key packages the commit adds"
                )
        if group_info:
            try:
                describes = candidate.describes(group_info)
            except mls.MlsError as e:
                raise InvalidRequest(f"invalid group info: {e}") from e
            if not describes:
                raise InvalidRequest(
                    f"group_info does not describe epoch {applied.epoch} as the commit creates it"
                )

        # accepted: from here on nothing can fail
        if not state.pending and not applied.is_external:
            state.updates[identity] = tx.now
        judges = [
            m.identity
            for m in before.members()
            if m.identity != identity and m.identity not in removed
        ]
        if group_info:
            state.group_info = group_info
        add_refs = {p.identity: p.kp_ref for p in state.pending if p.kind == "add"}
        for name in removed:
            state.members.pop(name, None)
        for name in added:
            participant = state.participants.get(name)
            ref = add_refs.get(name) or (participant.kp_ref if participant else b"")
            state.members[name] = ref
            tx.drop_key_packages.add(ref)
        state.epoch = applied.epoch
        state.pending = []
        state.commit_request = None
        state.avoid = []
        state.phase_since = tx.now
        tx.observed = candidate
        tx.observed_changed = True
        seq = tx.emit(
            commit=pb.Commit(
                epoch=epoch, message=commit, committer=identity, added=added, removed=removed
            )
        )
        welcomed = tuple(a for a in added if a != identity)
        welcome_seq = 0
        if welcomed and not applied.is_external:
            welcome_seq = tx.emit(
                welcome=pb.Welcome(
                    epoch=applied.epoch,
                    message=welcome,
                    recipients=welcomed,
                    key_package_refs=welcome_refs,
                ),
                recipients=welcomed,
            )
        state.last_commit = CommitRecord(
            epoch=applied.epoch,
            seq=seq,
            committer=identity,
            judges=judges,
            accepted_at=tx.now,
            welcome_seq=welcome_seq,
            added=list(welcomed),
        )
        self._remember_accepted(state, digest, seq, applied.epoch)
        await self._reconcile(tx)
        return pb.SubmitCommitResponse(seq=seq, epoch=applied.epoch)

    def _check_committer(
        self,
        state: RoomState,
        before: mls.ObservedGroup,
        applied: mls.CommitApplied,
        identity: str,
    ) -> None:
        if applied.is_external:
            # a re-join: the joiner may only bring itself in and drop its own stale leaf
            joiner = applied.added[0].identity if applied.added else ""
            if joiner != identity:
                raise PermissionDenied("an external commit must add the caller itself")
            if identity not in state.participants:
                raise PermissionDenied("join (upload a key package) before an external commit")
            if any(m.identity != identity for m in applied.removed):
                raise PermissionDenied("an external commit may only remove the caller's old leaf")
            return
        member = before.member_at(applied.committer)
        if member is None or member.identity != identity:
            raise PermissionDenied("the commit's sender is not the caller")
        if applied.by_value_proposals:
            raise PermissionDenied(
                "membership changes only through the delivery service's proposals "
                f"(commit carries {', '.join(applied.by_value_proposals)} by value)"
            )

    @staticmethod
    def ready_counts(state: RoomState, identity: str, epoch: int) -> bool:
        """Whether a ready ack for ``epoch`` counts towards the open transition.

        Ready acks are soft state kept by the store per (generation, epoch): they are
        many (one per member and epoch) and a lost one only delays the transition to its
        deadline. Late acks of executed epochs are accepted and ignored.
        """
        if epoch > state.epoch and state.phase is Phase.ACTIVE:
            raise EpochConflict(f"the room is at epoch {state.epoch}", state.epoch)
        if not state.transition_open or epoch < state.epoch:
            return False
        if identity not in state.members:
            raise NotFound(f"{identity!r} is not a member of epoch {epoch}")
        return True

    async def execute_if_ready(self, tx: RoomTx, epoch: int) -> None:
        """Executes the open transition to ``epoch`` once every reachable member acked it
        (``tx.ready``); a disputed commit is judged first."""
        state = tx.state
        if not state.transition_open or state.epoch != epoch:
            return
        if state.disputed and await self._judge(tx) != "reporter":
            return  # still waiting for verdicts, or the generation was reset
        if self._everyone_ready(tx):
            await self._execute(tx)

    async def report_failure(self, tx: RoomTx, identity: str, seq: int, reason: str) -> str:
        """A member could not process the event at ``seq``. Returns what the DS concluded:

        * ``"dispute"``: it is a member that had to process the room's latest commit, whose
          transition is still open; the report is weighed with the others' (``_judge``);
        * ``"welcome"``: it could not use the Welcome of the latest commit: its leaf is
          removed and its next Add is not committed by the same member;
        * ``"stale"``: about a generation that was retired since: nothing to do;
        * ``"leaf"``: anything else (an older commit, a proposal, a commit everyone else
          confirmed): its own state is broken, its leaf is removed.

        The reporter joins again with a new key package in every case.
        """
        state = tx.state
        if seq and seq <= state.reset_seq:
            return "stale"  # about a retired generation: the reporter joins the new one
        commit = state.last_commit
        if (
            commit is not None
            and seq == commit.seq
            and identity in commit.judges
            and state.transition_open
            and state.epoch == commit.epoch
        ):
            if identity not in commit.reporters:
                commit.reporters.append(identity)
                tx.changed()
            verdict = await self._judge(tx)
            return "dispute" if verdict is None else f"dispute: {verdict}"
        if commit is not None and seq and seq == commit.welcome_seq and identity in commit.added:
            if commit.committer != identity:
                state.avoid = [commit.committer]
            await self.leave(tx, identity)
            return "welcome"
        await self.leave(tx, identity)
        return "leaf"

    async def _judge(self, tx: RoomTx) -> str | None:
        """Weighs the reports about the open transition's commit (docs/protocol.md, "Bad
        commits") and acts; None while verdicts are still due.

        * two or more judges could not process it: the commit is bad. A new generation
          starts without its committer, who may not join again for ``blame_cooldown``;
        * one could, and another confirmed it (Ready): the reporter's own state is broken;
          the transition goes on (its re-join replaces its leaf);
        * one could not and nobody confirmed: nobody can be blamed (one member's word
          against another's): a new generation, nobody removed.

        No single member's reports can get another member removed.
        """
        state = tx.state
        commit = state.last_commit
        if commit is None or not state.disputed:
            return None
        bad = set(commit.reporters)
        good = (tx.ready or set()) & (set(commit.judges) - bad)
        waiting = [j for j in commit.judges if j not in bad | good and tx.reachable(j)]
        deadline = commit.accepted_at + self.config.execute_timeout
        if len(bad) >= 2:
            verdict = "committer"
        elif waiting and tx.now < deadline:
            return None
        elif good:
            verdict = "reporter"
        else:
            verdict = "ambiguous"
        failed = ", ".join(sorted(bad))
        if verdict == "committer":
            gone = state.participants.pop(commit.committer, None)
            if gone is not None and not self._kp_in_use(state, gone):
                tx.drop_key_packages.add(gone.kp_ref)
            state.cooldown[commit.committer] = tx.now + self.config.blame_cooldown
            await self._reset(
                tx,
                f"{failed} could not process the commit of {commit.committer!r} for epoch "
                f"{commit.epoch - 1}: the group starts again without it",
                avoid=commit.committer,
            )
        elif verdict == "ambiguous":
            await self._reset(
                tx,
                f"{failed} could not process the commit of {commit.committer!r} for epoch "
                f"{commit.epoch - 1} and no other member confirmed it: the group starts again",
                avoid=commit.committer,
            )
        else:
            commit.reporters = []
            tx.changed()
            for name in bad:  # a reporter that has not joined again: its leaf is unusable
                participant = state.participants.get(name)
                if participant is not None and state.members.get(name) == participant.kp_ref:
                    await self.leave(tx, name)
        return verdict

    @staticmethod
    def all_ready(
        members: Iterable[str], ready: set[str], connected: frozenset[str] | None
    ) -> bool:
        """Every member that is reachable (all, if ``connected`` is None) acked: a member
        whose stream is gone cannot apply the commit now, and waiting for it would only
        hold everyone else to the deadline."""
        return all(m in ready for m in members if connected is None or m in connected)

    def _everyone_ready(self, tx: RoomTx) -> bool:
        return tx.ready is not None and self.all_ready(tx.state.members, tx.ready, tx.connected)

    async def leave(self, tx: RoomTx, identity: str, *, left_at: float | None = None) -> bool:
        """Drops an identity's wish to be in the group. ``left_at`` guards against a late
        leave notice (webhook) for a session older than the identity's current join."""
        participant = tx.state.participants.get(identity)
        if participant is None:
            return False
        if left_at is not None and left_at < participant.joined_at:
            return False
        del tx.state.participants[identity]
        if not self._kp_in_use(tx.state, participant):
            tx.drop_key_packages.add(participant.kp_ref)
        tx.changed()
        await self._reconcile(tx)
        return True

    async def tick(self, tx: RoomTx) -> list[str]:
        """Acts on every deadline that passed, and on presence: participants gone longer
        than the presence timeout (``tx.absent``) leave, and an open transition executes
        as soon as every reachable member is ready. Returns who left for being gone."""
        state, cfg = tx.state, self.config
        vanished = sorted(tx.absent & state.participants.keys())
        for name in vanished:
            await self.leave(tx, name)
        for name, expires in list(state.expiries.items()):
            # an expired credential makes every joiner refuse the group: its holder goes
            if expires <= tx.now and name in state.participants:
                vanished.append(name)
                await self.leave(tx, name)
        if state.phase is Phase.CREATING and tx.now >= state.phase_since + cfg.create_timeout:
            # the creator never answered: it cannot be trusted to be alive
            gone = state.participants.pop(state.creator, None)
            if gone is not None:
                tx.drop_key_packages.add(gone.kp_ref)
            await self._reset(tx, "the creator did not create the group in time")
        elif state.disputed:
            if await self._judge(tx) == "reporter" and self._transition_due(tx):
                await self._execute(tx)
        elif state.transition_open:
            if self._transition_due(tx):
                await self._execute(tx)
        elif self._anyone_request_expired(tx):
            await self._reset(tx, "no member committed the pending proposals", avoid="")
        else:
            await self._request_commit(tx)
        return vanished

    def _transition_due(self, tx: RoomTx) -> bool:
        """Every reachable member is ready, or the execute deadline passed — unless no
        member that had to process the commit confirmed it yet while some could: then
        it waits up to three deadlines for their Ready or their reports (a commit nobody
        can process must not execute because its reports came late)."""
        state, cfg = tx.state, self.config
        if self._everyone_ready(tx):
            return True
        if tx.now < state.phase_since + cfg.execute_timeout:
            return False
        commit = state.last_commit
        if commit is None or commit.epoch != state.epoch or tx.ready is None:
            return True
        judges = [j for j in commit.judges if tx.reachable(j)]
        confirmed = any(j in tx.ready for j in judges)
        if confirmed or not judges:
            return True
        return tx.now >= state.phase_since + 3 * cfg.execute_timeout

    def _anyone_request_expired(self, tx: RoomTx) -> bool:
        """Every member was passed over and nobody committed for two commit timeouts."""
        request = tx.state.commit_request
        return (
            request is not None
            and request.epoch == tx.state.epoch
            and request.committer == ""
            and request.refs == [p.ref for p in tx.state.pending]
            and tx.now >= request.at + 2 * self.config.commit_timeout
        )

    def next_deadline(self, state: RoomState, now: float) -> float | None:
        deadline = self._next_ordering_deadline(state, now)
        expiry = min(
            (t for n, t in state.expiries.items() if n in state.participants), default=None
        )
        return min((d for d in (deadline, expiry) if d is not None), default=None)

    def _next_ordering_deadline(self, state: RoomState, now: float) -> float | None:
        cfg = self.config
        if state.phase is Phase.CREATING:
            return state.phase_since + cfg.create_timeout
        if state.phase is not Phase.ACTIVE:
            return None
        if state.transition_open:
            # the execute deadline, then (a commit nobody confirmed yet) the next ones, up
            # to three: the tick decides with the ready acks (_transition_due)
            steps = min(3, int(max(0.0, now - state.phase_since) // cfg.execute_timeout) + 1)
            return state.phase_since + steps * cfg.execute_timeout
        if not state.pending:
            return None
        request = state.commit_request
        if request is not None and request.refs == [p.ref for p in state.pending]:
            return request.at + cfg.commit_timeout * (1 if request.committer else 2)
        return self._batch_due(state)

    # ---- internals -----------------------------------------------------------------

    @staticmethod
    def _remember_accepted(state: RoomState, digest: str, seq: int, epoch: int) -> None:
        """For idempotent retries of an accepted commit or group creation."""
        state.accepted[digest] = [seq, epoch]
        while len(state.accepted) > ACCEPTED_COMMITS_KEPT:
            del state.accepted[next(iter(state.accepted))]

    @staticmethod
    def _kp_in_use(state: RoomState, participant: Participant) -> bool:
        """True while a pending Add still refers to the participant's key package."""
        return any(p.kind == "add" and p.kp_ref == participant.kp_ref for p in state.pending)

    def _batch_due(self, state: RoomState) -> float:
        cfg = self.config
        if any(p.kind == "remove" for p in state.pending):
            return min(p.issued_at for p in state.pending)
        first = min(p.issued_at for p in state.pending)
        # "quiet" counts from the latest join, including joins whose Add is still held
        joining = [p for name, p in state.participants.items()
                   if state.members.get(name) != p.kp_ref]  # fmt: skip
        last = max([p.issued_at for p in state.pending] + [p.joined_at for p in joining])
        # an Add proposed after its participant joined was held: a burst is under way
        joined_at = {p.kp_ref: p.joined_at for p in joining}
        burst = any(
            p.kind == "add" and p.issued_at > joined_at.get(p.kp_ref, p.issued_at)
            for p in state.pending
        )
        quiet = cfg.burst_quiet if burst else cfg.batch_quiet
        return min(last + quiet, first + cfg.batch_max_wait)

    async def _execute(self, tx: RoomTx) -> None:
        state = tx.state
        state.executed_epoch = state.epoch
        state.phase_since = tx.now
        tx.emit(execute=pb.TransitionExecute(epoch=state.epoch))
        await self._request_commit(tx)

    async def _reconcile(self, tx: RoomTx) -> None:
        """Proposes what makes the group's roster match ``participants``."""
        state = tx.state
        if state.disputed:
            return  # nothing changes until the disputed commit is judged
        if state.phase is Phase.EMPTY:
            if state.participants:
                await self._start_generation(tx, "")
            return
        if state.phase is Phase.CREATING:
            if state.creator not in state.participants:
                await self._reset(tx, "the creator left before creating the group")
            return
        observed = tx.observed
        assert observed is not None
        pending = {(p.kind, p.identity) for p in state.pending}
        roster = {m.identity: m for m in await asyncio.to_thread(observed.members)}
        expiries = {n: float(m.not_after) for n, m in roster.items() if m.not_after is not None}
        if expiries != state.expiries:
            state.expiries = expiries
            tx.changed()

        def current(identity: str) -> bool:
            participant = state.participants.get(identity)
            return participant is not None and state.members.get(identity) == participant.kp_ref

        committers = [m for name, m in roster.items() if current(name)]
        if not committers:
            # nobody left who can commit: retire this generation
            await self._reset(tx, "no member of the group remains")
            return
        for name, member in roster.items():
            if not current(name) and ("remove", name) not in pending:
                message, ref = await asyncio.to_thread(observed.propose_remove, member.leaf_index)
                self._issue(tx, message, ref, "remove", name, b"")
        # While a commit is requested, new Adds wait for the next epoch: a commit must carry
        # every pending proposal, so Adds streaming in during a burst of joins would make
        # every commit attempt miss one, until the joins stop. (Removes are not held.)
        request = state.commit_request
        hold_adds = request is not None and request.epoch == state.epoch
        for name, participant in list(state.participants.items()):  # may drop entries
            if current(name) or ("add", name) in pending or hold_adds:
                continue
            key_package = await tx.key_package(participant.kp_ref)
            try:
                if key_package is None:
                    raise mls.StateError("key package lost")
                message, ref = await asyncio.to_thread(observed.propose_add, key_package)
            except mls.MlsError:
                # e.g. the key package expired: forget the participant, it must join again
                del state.participants[name]
                tx.drop_key_packages.add(participant.kp_ref)
                continue
            self._issue(tx, message, ref, "add", name, participant.kp_ref)
        await self._request_commit(tx)

    def _issue(
        self, tx: RoomTx, message: bytes, ref: bytes, kind: str, identity: str, kp_ref: bytes
    ) -> None:
        state = tx.state
        state.pending.append(PendingProposal(ref, kind, identity, kp_ref, tx.now))
        tx.observed_changed = True
        tx.emit(
            proposal=pb.Proposal(
                epoch=state.epoch,
                message=message,
                kind=kind,
                target_identity=identity,
                proposal_ref=ref,
            )
        )

    def _designated_committer(self, tx: RoomTx, exclude: frozenset[str] = frozenset()) -> str:
        """The lowest leaf among members that stay (no pending Remove, current key package),
        are not in ``exclude`` and are reachable (if none is: the lowest of the others);
        "" (anyone) if there is none."""
        state = tx.state
        leaving = {p.identity for p in state.pending if p.kind == "remove"} | exclude
        assert tx.observed is not None
        candidates: list[tuple[bool, int, str]] = []
        for member in tx.observed.members():
            name = member.identity
            if name in leaving or name not in state.participants:
                continue
            if state.members.get(name) != state.participants[name].kp_ref:
                continue
            candidates.append((not tx.reachable(name), member.leaf_index, name))
        return min(candidates)[2] if candidates else ""

    async def _request_commit(self, tx: RoomTx) -> None:
        state = tx.state
        if state.phase is not Phase.ACTIVE or state.transition_open or not state.pending:
            return
        refs = [p.ref for p in state.pending]
        request = state.commit_request
        if request is not None and request.epoch == state.epoch and request.refs == refs:
            if request.committer and tx.now >= request.at + self.config.commit_timeout:
                # The designee stayed silent: designate the next member, so that a room of
                # hundreds does not commit all at once; after everyone, anyone may.
                passed = [*request.passed, request.committer]
                committer = self._designated_committer(tx, exclude=frozenset(passed + state.avoid))
                state.commit_request = CommitRequestState(
                    state.epoch, committer, refs, tx.now, passed
                )
                tx.emit(commit_request=pb.CommitRequest(epoch=state.epoch, committer=committer))
            return
        if tx.now < self._batch_due(state):
            return
        # new proposals renew the request, but designees that already let a deadline of
        # this epoch pass stay passed over (each would cost another commit timeout)
        passed = (
            list(request.passed) if request is not None and request.epoch == state.epoch else []
        )
        committer = self._designated_committer(tx, exclude=frozenset(passed))
        state.commit_request = CommitRequestState(state.epoch, committer, refs, tx.now, passed)
        tx.emit(commit_request=pb.CommitRequest(epoch=state.epoch, committer=committer))

    async def _start_generation(self, tx: RoomTx, reason: str, avoid: str = "") -> None:
        """Asks the longest-waiting participant (not ``avoid``, if another is waiting) to
        create a new group."""
        state = tx.state
        waiting = [p for p in state.participants.values() if p.identity != avoid]
        creator = min(waiting or state.participants.values(), key=lambda p: p.joined_at).identity
        state.phase = Phase.CREATING
        state.creator = creator
        state.phase_since = tx.now
        state.group_id = group_id_for(state.room, state.generation)
        self._request_creation(tx)

    def _request_creation(self, tx: RoomTx) -> None:
        state = tx.state
        tx.emit(
            create_group=pb.CreateGroup(
                creator=state.creator, group_id=state.group_id, config=self.room_config(state)
            ),
        )

    async def _reset(self, tx: RoomTx, reason: str, avoid: str = "") -> None:
        """Retires the current generation; participants waiting get a new group (created
        by anyone but ``avoid`` if possible)."""
        state = tx.state
        state.generation += 1
        state.phase = Phase.EMPTY
        state.group_id = b""
        state.creator = ""
        state.phase_since = tx.now
        state.observer_snapshot = b""
        state.group_info = b""
        state.epoch = 0
        state.executed_epoch = -1
        state.members = {}
        state.pending = []
        state.commit_request = None
        state.last_commit = None
        state.avoid = []
        tx.observed = None
        tx.observed_changed = True
        state.reset_seq = tx.emit(reset=pb.GroupReset(generation=state.generation, reason=reason))
        if state.participants:
            await self._start_generation(tx, reason, avoid)
