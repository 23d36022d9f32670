"""macp-sdk-python (unchanged, from PyPI) against macp-rs.

One complete session per standards-track mode, each agent on its own
`MacpClient` with `AuthConfig.for_dev_agent`, driven through the SDK's session
helpers. Every session has a passive subscriber attached live (right after
SessionStart) and one attached after resolution; both must see exactly the
accepted history, in order, ending with the Commitment, after which the
runtime ends the stream. Decision, Quorum and Task sessions also get a
decision receipt checked with the SDK's own verifier. Plus: discovery, error
paths, cancellation, suspend/resume, the asyncio client, the bidirectional
stream, governance policies and the SDK's agent framework.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import grpc
import pytest
from macp.v1 import core_pb2, envelope_pb2
from macp_sdk import (
    MODE_DECISION,
    MODE_HANDOFF,
    MODE_PROPOSAL,
    MODE_QUORUM,
    MODE_TASK,
    STANDARD_MODES,
    DecisionProjection,
    DecisionSession,
    HandoffProjection,
    HandoffSession,
    MacpAckError,
    MacpTransportError,
    ProposalProjection,
    ProposalSession,
    QuorumProjection,
    QuorumSession,
    TaskProjection,
    TaskSession,
    macp_error_code,
)

OPEN = envelope_pb2.SESSION_STATE_OPEN
RESOLVED = envelope_pb2.SESSION_STATE_RESOLVED
CANCELLED = envelope_pb2.SESSION_STATE_CANCELLED
TTL_MS = 120_000
TIMEOUT_S = float(os.environ.get("MACP_INTEROP_TIMEOUT", "10"))
# Envelopes only the runtime emits; they may appear on a stream.
RUNTIME_EMITTED = {"SessionCancel", "SessionSuspend", "SessionResume"}


@dataclass
class Transcript:
    """What the session's accepted history must be, built from the acks."""

    session_id: str
    entries: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, ack: envelope_pb2.Ack, message_type: str, sender: str, state: int = OPEN) -> None:
        assert ack.ok, ack
        assert not ack.duplicate, ack
        assert ack.session_id == self.session_id
        assert ack.session_state == state, ack
        assert ack.message_id
        self.entries.append((message_type, sender, ack.message_id))


def triples(envelopes) -> list[tuple[str, str, str]]:
    return [(e.message_type, e.sender, e.message_id) for e in envelopes]


def finish(
    t: Transcript,
    mode: str,
    live,
    late,
    projection,
    action: str,
    positive: bool,
    readers: list,
    initiator: str,
    participants: list[str],
    helpers: list,
) -> None:
    """Common end-of-session checks: the streamed history, the Commitment, and
    GetSession from every agent. `helpers` are the session helpers that sent
    the messages: what was streamed must equal what they sent, field for field."""
    assert t.entries[-1][0] == "Commitment"
    sent = {e.message_id: e for h in helpers for e in h.projection.transcript}
    assert set(sent) == {m for (_, _, m) in t.entries}
    for sub in (live, late):
        got = sub.until_end()  # returns because the runtime ends the stream
        assert triples(got) == t.entries
        for e in got:
            assert e == sent[e.message_id]
        assert sub.inline_errors == []
        for e in got:
            assert e.session_id == t.session_id and e.mode == mode and e.macp_version == "1.0"
        commitment = core_pb2.CommitmentPayload.FromString(got[-1].payload)
        assert commitment.action == action
        assert commitment.outcome_positive is positive
        assert commitment.mode_version == "1.0.0"
    # The SDK's own projection, fed from the stream, reaches the same end.
    for env in live.received:
        projection.apply_envelope(env)
    assert projection.is_committed
    assert projection.commitment.action == action
    assert projection.is_positive_outcome is positive
    for client in readers:
        md = client.get_session(t.session_id).metadata
        assert md.state == RESOLVED
        assert md.session_id == t.session_id
        assert md.mode == mode
        assert md.initiator == initiator
        assert list(md.participants) == participants
        assert md.mode_version == "1.0.0"
        assert md.policy_version == "policy.default"


def history_digest(envelopes) -> str:
    """The receipt's transcript digest (`macp-rs-history-sha256/1`, defined in
    macp-receipt/src/transcript.rs), recomputed from replayed envelopes."""
    h = hashlib.sha256(b"macp-rs-history-sha256/1:")
    for env in envelopes:
        encoded = env.SerializeToString()
        h.update(len(encoded).to_bytes(8, "big"))
        h.update(encoded)
    return "sha256:" + h.hexdigest()


def check_receipt(client, session_id: str, history) -> None:
    """The runtime's receipt for a resolved session: attested by the SDK's
    `verify_receipt` with the keys from `get_receipt_keys()`, the same bytes
    on every call, covering exactly the replayed `history`, and `unverified`
    once a byte of the recorded commitment is changed."""
    from macp_sdk.receipt import trusted_keys_from_jwks, verify_receipt

    result = client.get_decision_receipt(session_id)
    keys = trusted_keys_from_jwks(client.get_receipt_keys())
    assert keys, "a --dev runtime signs receipts"
    outcome = verify_receipt(result.receipt, keys)
    assert outcome == {"integrity": "match", "attestations": ["valid"], "verdict": "attested"}, outcome
    assert client.get_decision_receipt(session_id).raw == result.raw
    receipt = result.receipt
    assert receipt["session_id"] == session_id
    commitment = core_pb2.CommitmentPayload.FromString(history[-1].payload)
    assert receipt["commitment"]["commitment_id"] == commitment.commitment_id
    assert receipt["transcript"]["digest"] == history_digest(history)
    assert receipt["transcript"]["message_count"] == len(history)
    # One byte of the recorded decision changed: the hash no longer matches.
    at = result.raw.index('"reason":"') + len('"reason":"')
    changed = result.raw[:at] + ("X" if result.raw[at] != "X" else "Y") + result.raw[at + 1 :]
    assert verify_receipt(json.loads(changed), keys)["verdict"] == "unverified"


def test_initialize_and_discovery(agent):
    c = agent("coordinator")
    init = c.initialize()
    assert init.selected_protocol_version == "1.0"
    assert init.capabilities.sessions.stream
    assert init.capabilities.cancellation.cancel_session
    assert set(STANDARD_MODES) <= set(init.supported_modes)
    # run.sh starts `--dev`, which signs receipts with an ephemeral key.
    assert init.capabilities.decision_receipt.get_decision_receipt
    assert init.capabilities.decision_receipt.signed
    listed = {m.mode for m in c.list_modes().modes}
    assert listed == set(STANDARD_MODES)
    assert c.get_manifest().manifest.agent_id


def test_decision(agent, subscribe):
    coord, alice, bob, auditor = (agent(n) for n in ("coordinator", "alice", "bob", "auditor"))
    participants = ["coordinator", "alice", "bob", "auditor"]
    s = DecisionSession(coord)
    t = Transcript(s.session_id)
    t.add(s.start(intent="pick a database", participants=participants, ttl_ms=TTL_MS), "SessionStart", "coordinator")
    live = subscribe(auditor, s.session_id)
    assert live.next().message_type == "SessionStart"

    a = DecisionSession(alice, session_id=s.session_id)
    b = DecisionSession(bob, session_id=s.session_id)
    t.add(s.propose("p1", "postgres", rationale="boring and solid"), "Proposal", "coordinator")
    t.add(a.evaluate("p1", "APPROVE", confidence=0.9, reason="fits"), "Evaluation", "alice")
    t.add(b.raise_objection("p1", reason="ops cost", severity="low"), "Objection", "bob")
    t.add(a.vote("p1", "APPROVE"), "Vote", "alice")
    t.add(b.vote("p1", "APPROVE", reason="fine"), "Vote", "bob")
    ack = s.commit(action="decision.selected", authority_scope="team", reason="p1 approved")
    t.add(ack, "Commitment", "coordinator", RESOLVED)
    assert s.projection.is_committed

    late = subscribe(alice, s.session_id)
    finish(
        t, MODE_DECISION, live, late, DecisionProjection(), "decision.selected", True,
        [coord, alice, auditor], "coordinator", participants, [s, a, b],
    )
    check_receipt(auditor, s.session_id, late.received)


def test_proposal(agent, subscribe):
    coord, buyer, seller = (agent(n) for n in ("coordinator", "buyer", "seller"))
    participants = ["buyer", "seller"]
    s = ProposalSession(coord)
    t = Transcript(s.session_id)
    t.add(s.start(intent="agree a price", participants=participants, ttl_ms=TTL_MS), "SessionStart", "coordinator")
    # The initiator need not be a participant; it may still subscribe.
    live = subscribe(agent("coordinator"), s.session_id)
    assert live.next().message_type == "SessionStart"

    sb = ProposalSession(buyer, session_id=s.session_id)
    ss = ProposalSession(seller, session_id=s.session_id)
    t.add(ss.propose("offer-1", "100 units at 10", summary="opening", tags=["price"]), "Proposal", "seller")
    t.add(sb.reject("offer-1", reason="too high"), "Reject", "buyer")
    t.add(sb.counter_propose("offer-2", "offer-1", "100 units at 8"), "CounterProposal", "buyer")
    t.add(ss.accept("offer-2", reason="ok"), "Accept", "seller")
    t.add(sb.accept("offer-2"), "Accept", "buyer")
    ack = s.commit(action="proposal.accepted", authority_scope="deal", reason="offer-2 accepted by all")
    t.add(ack, "Commitment", "coordinator", RESOLVED)

    late = subscribe(seller, s.session_id)
    finish(
        t, MODE_PROPOSAL, live, late, ProposalProjection(), "proposal.accepted", True,
        [coord, buyer, seller], "coordinator", participants, [s, sb, ss],
    )


def test_task(agent, subscribe):
    coord, worker, auditor = (agent(n) for n in ("coordinator", "worker", "auditor"))
    participants = ["worker", "auditor"]
    s = TaskSession(coord)
    t = Transcript(s.session_id)
    t.add(s.start(intent="summarise logs", participants=participants, ttl_ms=TTL_MS), "SessionStart", "coordinator")
    live = subscribe(auditor, s.session_id)
    assert live.next().message_type == "SessionStart"

    w = TaskSession(worker, session_id=s.session_id)
    ack = s.request_task("t1", "summarise", instructions="last 24h", requested_assignee="worker")
    t.add(ack, "TaskRequest", "coordinator")
    t.add(w.accept_task("t1", assignee="worker"), "TaskAccept", "worker")
    t.add(w.update_task("t1", status="running", progress=0.5, message="halfway"), "TaskUpdate", "worker")
    t.add(w.complete_task("t1", assignee="worker", output=b"all quiet", summary="done"), "TaskComplete", "worker")
    ack = s.commit(action="task.completed", authority_scope="ops", reason="t1 complete")
    t.add(ack, "Commitment", "coordinator", RESOLVED)

    late = subscribe(worker, s.session_id)
    finish(
        t, MODE_TASK, live, late, TaskProjection(), "task.completed", True,
        [coord, worker, auditor], "coordinator", participants, [s, w],
    )
    check_receipt(coord, s.session_id, late.received)


def test_handoff(agent, subscribe):
    owner, alice, bob, auditor = (agent(n) for n in ("owner", "alice", "bob", "auditor"))
    participants = ["owner", "alice", "bob", "auditor"]
    s = HandoffSession(owner)
    t = Transcript(s.session_id)
    t.add(s.start(intent="hand over on-call", participants=participants, ttl_ms=TTL_MS), "SessionStart", "owner")
    live = subscribe(auditor, s.session_id)
    assert live.next().message_type == "SessionStart"

    a = HandoffSession(alice, session_id=s.session_id)
    b = HandoffSession(bob, session_id=s.session_id)
    t.add(s.offer("h1", "alice", scope="pager", reason="vacation"), "HandoffOffer", "owner")
    t.add(s.add_context("h1", content_type="text/plain", context=b"runbook v3"), "HandoffContext", "owner")
    t.add(a.decline("h1", declined_by="alice", reason="busy"), "HandoffDecline", "alice")
    t.add(s.offer("h2", "bob", scope="pager"), "HandoffOffer", "owner")
    t.add(b.accept_handoff("h2", accepted_by="bob"), "HandoffAccept", "bob")
    ack = s.commit(action="handoff.accepted", authority_scope="pager", reason="bob took it")
    t.add(ack, "Commitment", "owner", RESOLVED)

    late = subscribe(bob, s.session_id)
    finish(
        t, MODE_HANDOFF, live, late, HandoffProjection(), "handoff.accepted", True,
        [owner, alice, bob, auditor], "owner", participants, [s, a, b],
    )


def test_quorum(agent, subscribe):
    coord, alice, bob, carol, auditor = (agent(n) for n in ("coordinator", "alice", "bob", "carol", "auditor"))
    participants = ["alice", "bob", "carol", "auditor"]
    s = QuorumSession(coord)
    t = Transcript(s.session_id)
    ack = s.start(intent="approve the release", participants=participants, ttl_ms=TTL_MS)
    t.add(ack, "SessionStart", "coordinator")
    live = subscribe(auditor, s.session_id)
    assert live.next().message_type == "SessionStart"

    qa, qb, qc = (QuorumSession(c, session_id=s.session_id) for c in (alice, bob, carol))
    ack = s.request_approval("r1", "ship 2.0", summary="release", required_approvals=2)
    t.add(ack, "ApprovalRequest", "coordinator")
    t.add(qa.approve("r1", reason="tests green"), "Approve", "alice")
    t.add(qc.reject("r1", reason="docs missing"), "Reject", "carol")
    t.add(qb.approve("r1"), "Approve", "bob")
    assert s.quorum_projection.approval_count("r1") == 0  # each helper only tracks its own sends
    ack = s.commit(action="quorum.approved", authority_scope="release", reason="2 of 4 approved")
    t.add(ack, "Commitment", "coordinator", RESOLVED)

    late = subscribe(carol, s.session_id)
    projection = QuorumProjection()
    finish(
        t, MODE_QUORUM, live, late, projection, "quorum.approved", True,
        [coord, alice, bob, carol, auditor], "coordinator", participants, [s, qa, qb, qc],
    )
    assert projection.approval_count("r1") == 2
    assert projection.rejection_count("r1") == 1
    check_receipt(carol, s.session_id, late.received)


def test_rejections_surface_as_sdk_errors(agent, subscribe):
    coord, alice, mallory = agent("coordinator"), agent("alice"), agent("mallory")
    s = DecisionSession(coord)
    t = Transcript(s.session_id)
    t.add(s.start(intent="x", participants=["coordinator", "alice"], ttl_ms=TTL_MS), "SessionStart", "coordinator")
    live = subscribe(alice, s.session_id)
    assert live.next().message_type == "SessionStart"

    # Not eligible yet: no proposal.
    with pytest.raises(MacpAckError) as e:
        s.commit(action="decision.selected", authority_scope="x", reason="too early")
    assert e.value.failure.code == "INVALID_ENVELOPE"
    t.add(s.propose("p1", "yes"), "Proposal", "coordinator")

    # A vote from an agent that is not a declared participant.
    m = DecisionSession(mallory, session_id=s.session_id)
    with pytest.raises(MacpAckError) as e:
        m.vote("p1", "APPROVE")
    assert e.value.failure.code == "FORBIDDEN"
    assert e.value.failure.session_id == s.session_id
    assert e.value.failure.message_id
    # Commitment from a participant that is not the commitment authority.
    a = DecisionSession(alice, session_id=s.session_id)
    with pytest.raises(MacpAckError) as e:
        a.commit(action="decision.selected", authority_scope="x", reason="not mine")
    assert e.value.failure.code == "FORBIDDEN"
    # raise_on_nack=False hands back the NACK itself.
    env = build_vote(m, "p1")
    nack = mallory.send(env, raise_on_nack=False)
    assert not nack.ok and nack.error.code == "FORBIDDEN"
    assert nack.session_state == envelope_pb2.SESSION_STATE_UNSPECIFIED
    # The runtime derives the sender from the credentials: claiming to be
    # someone else is UNAUTHENTICATED (the SDK's helpers refuse this locally).
    spoofed = build_vote(a, "p1")
    with pytest.raises(MacpAckError) as e:
        mallory.send(spoofed)
    assert e.value.failure.code == "UNAUTHENTICATED"
    # Reading the session is refused to outsiders, unknown sessions are NOT_FOUND.
    # The registry code rides in `macp-error-code` metadata.
    with pytest.raises(grpc.RpcError) as e:
        mallory.get_session(s.session_id)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert macp_error_code(e.value) == "FORBIDDEN"
    with pytest.raises(grpc.RpcError) as e:
        coord.get_session(DecisionSession(coord).session_id)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert macp_error_code(e.value) == "SESSION_NOT_FOUND"
    # Subscribing to a session you may not read fails the stream.
    denied = subscribe(mallory, s.session_id)
    with pytest.raises(MacpTransportError) as e:
        denied.until_end()
    assert (e.value.code, e.value.macp_code) == ("PERMISSION_DENIED", "FORBIDDEN")

    # Rejected envelopes never reach the stream; the session is still usable.
    t.add(a.vote("p1", "APPROVE"), "Vote", "alice")
    t.add(s.commit(action="decision.selected", authority_scope="x", reason="ok"), "Commitment", "coordinator", RESOLVED)
    assert triples(live.until_end()) == t.entries
    # After resolution: SESSION_NOT_OPEN.
    with pytest.raises(MacpAckError) as e:
        s.commit(action="decision.selected", authority_scope="x", reason="again")
    assert e.value.failure.code == "SESSION_NOT_OPEN"


def test_receipt_errors(agent):
    """No receipt before a Commitment resolves the session, and none for an
    agent that may not read it; the codes reach the SDK's errors."""
    coord, mallory = agent("coordinator"), agent("mallory")
    s = DecisionSession(coord)
    s.start(intent="x", participants=["coordinator"], ttl_ms=TTL_MS)
    with pytest.raises(MacpTransportError) as e:
        coord.get_decision_receipt(s.session_id)
    assert (e.value.code, e.value.macp_code) == ("FAILED_PRECONDITION", "RECEIPT_UNAVAILABLE")
    with pytest.raises(MacpTransportError) as e:
        mallory.get_decision_receipt(s.session_id)
    assert (e.value.code, e.value.macp_code) == ("PERMISSION_DENIED", "FORBIDDEN")
    with pytest.raises(MacpTransportError) as e:
        coord.get_decision_receipt(DecisionSession(coord).session_id)
    assert (e.value.code, e.value.macp_code) == ("NOT_FOUND", "SESSION_NOT_FOUND")


def build_vote(session: DecisionSession, proposal_id: str) -> envelope_pb2.Envelope:
    # The SDK's public envelope builders, for a raw `MacpClient.send`.
    from macp.modes.decision.v1 import decision_pb2
    from macp_sdk import build_envelope

    return build_envelope(
        mode=MODE_DECISION,
        message_type="Vote",
        session_id=session.session_id,
        sender=session.client.auth.sender,
        payload=decision_pb2.VotePayload(proposal_id=proposal_id, vote="APPROVE").SerializeToString(),
    )


def test_duplicate_send_is_idempotent(agent):
    from macp_sdk import build_envelope, build_session_start_payload, new_session_id

    coord = agent("coordinator")
    payload = build_session_start_payload(intent="x", participants=["coordinator"], ttl_ms=TTL_MS)
    env = build_envelope(
        mode=MODE_DECISION, message_type="SessionStart", session_id=new_session_id(), sender="coordinator",
        payload=payload.SerializeToString(),
    )
    first = coord.send(env)
    again = coord.send(env)
    assert first.ok and not first.duplicate
    assert again.ok and again.duplicate


def test_cancel(agent, subscribe):
    coord, worker = agent("coordinator"), agent("worker")
    s = TaskSession(coord)
    t = Transcript(s.session_id)
    t.add(s.start(intent="maybe later", participants=["worker"], ttl_ms=TTL_MS), "SessionStart", "coordinator")
    live = subscribe(worker, s.session_id)
    assert live.next().message_type == "SessionStart"
    t.add(s.request_task("t1", "something", requested_assignee="worker"), "TaskRequest", "coordinator")

    # Only the initiator may cancel.
    with pytest.raises(MacpTransportError) as e:
        TaskSession(worker, session_id=s.session_id).cancel(reason="not mine")
    assert (e.value.code, e.value.macp_code) == ("PERMISSION_DENIED", "FORBIDDEN")

    ack = s.cancel(reason="priorities changed")
    assert ack.ok and ack.session_state == CANCELLED
    assert coord.get_session(s.session_id).metadata.state == CANCELLED
    assert worker.get_session(s.session_id).metadata.state == CANCELLED
    # The stream ends; it carried the accepted history (and possibly the
    # runtime's own SessionCancel).
    got = live.until_end()
    assert [x for x in triples(got) if x[0] not in RUNTIME_EMITTED] == t.entries
    # A cancelled session takes no more messages; cancelling again is a no-op.
    with pytest.raises(MacpAckError) as e:
        TaskSession(worker, session_id=s.session_id).accept_task("t1")
    assert e.value.failure.code == "SESSION_NOT_OPEN"
    again = s.cancel(reason="again")
    assert again.ok and again.session_state == CANCELLED


def test_suspend_and_resume(agent, subscribe):
    coord, alice = agent("coordinator"), agent("alice")
    s = DecisionSession(coord)
    t = Transcript(s.session_id)
    t.add(s.start(intent="x", participants=["coordinator", "alice"], ttl_ms=TTL_MS), "SessionStart", "coordinator")
    live = subscribe(alice, s.session_id)
    t.add(s.propose("p1", "yes"), "Proposal", "coordinator")
    ack = s.suspend(reason="waiting on legal")
    assert ack.ok and ack.session_state == envelope_pb2.SESSION_STATE_SUSPENDED
    a = DecisionSession(alice, session_id=s.session_id)
    with pytest.raises(MacpAckError) as e:
        a.vote("p1", "APPROVE")
    assert e.value.failure.code == "SESSION_NOT_OPEN"
    ack = s.resume(reason="cleared")
    assert ack.ok and ack.session_state == OPEN
    t.add(a.vote("p1", "APPROVE"), "Vote", "alice")
    t.add(s.commit(action="decision.selected", authority_scope="x", reason="ok"), "Commitment", "coordinator", RESOLVED)
    got = live.until_end()
    assert [x for x in triples(got) if x[0] not in RUNTIME_EMITTED] == t.entries
    assert coord.get_session(s.session_id).metadata.state == RESOLVED


def test_subscribe_before_start(agent, subscribe):
    """The SDK's agent transport subscribes before the initiator's
    SessionStart may have landed and retries the runtime's NOT_FOUND."""
    import threading

    from macp_sdk.agent import GrpcTransportAdapter
    from macp_sdk.retry import RetryPolicy

    coord, worker = agent("coordinator"), agent("worker")
    s = TaskSession(coord)
    early = subscribe(worker, s.session_id)
    with pytest.raises(MacpTransportError) as e:
        early.until_end()
    assert (e.value.code, e.value.macp_code) == ("NOT_FOUND", "SESSION_NOT_FOUND")

    adapter = GrpcTransportAdapter(
        worker, s.session_id, subscribe_retry=RetryPolicy(max_retries=50, backoff_base=0.05, backoff_max=0.2)
    )
    seen: list = []
    failure: list = []

    def run() -> None:
        try:
            seen.extend(adapter.start())
        except Exception as exc:  # reported below
            failure.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    t = Transcript(s.session_id)
    t.add(s.start(intent="x", participants=["worker"], ttl_ms=TTL_MS), "SessionStart", "coordinator")
    w = TaskSession(worker, session_id=s.session_id)
    t.add(s.request_task("t1", "do it", requested_assignee="worker"), "TaskRequest", "coordinator")
    t.add(w.accept_task("t1"), "TaskAccept", "worker")
    t.add(w.fail_task("t1", error_code="E_DISK", reason="disk full", retryable=True), "TaskFail", "worker")
    ack = s.commit(action="task.failed", authority_scope="ops", reason="t1 failed")
    t.add(ack, "Commitment", "coordinator", RESOLVED)
    thread.join(timeout=TIMEOUT_S)
    assert not thread.is_alive(), "the agent transport did not see the stream end"
    assert failure == []
    assert [(m.message_type, m.sender, m.raw.message_id) for m in seen] == t.entries
    assert seen[-1].payload["action"] == "task.failed"
    assert adapter.last_sequence == len(t.entries)


def test_async_client(target):
    """The asyncio client and session helpers (grpc.aio) against the same runtime."""
    import asyncio

    from macp_sdk import AsyncMacpClient, AsyncQuorumSession, AuthConfig

    async def main() -> None:
        def client(name: str) -> AsyncMacpClient:
            return AsyncMacpClient(
                target=target, allow_insecure=True, auth=AuthConfig.for_dev_agent(name), default_timeout=TIMEOUT_S
            )

        coord, alice, bob = client("coordinator"), client("alice"), client("bob")
        try:
            s = AsyncQuorumSession(coord)
            t = Transcript(s.session_id)
            ack = await s.start(intent="x", participants=["alice", "bob"], ttl_ms=TTL_MS)
            t.add(ack, "SessionStart", "coordinator")
            stream = alice.open_stream()
            await stream.send_subscribe(s.session_id, 0)
            first = await stream.read(timeout=TIMEOUT_S)
            assert first is not None and first.message_type == "SessionStart"
            qa = AsyncQuorumSession(alice, session_id=s.session_id)
            qb = AsyncQuorumSession(bob, session_id=s.session_id)
            ack = await s.request_approval("r1", "deploy", required_approvals=2)
            t.add(ack, "ApprovalRequest", "coordinator")
            t.add(await qa.approve("r1"), "Approve", "alice")
            t.add(await qb.reject("r1", reason="no"), "Reject", "bob")
            ack = await s.commit(action="quorum.rejected", authority_scope="x", reason="threshold unreachable")
            t.add(ack, "Commitment", "coordinator", RESOLVED)
            got = [first]
            while (env := await stream.read(timeout=TIMEOUT_S)) is not None:
                got.append(env)
            assert triples(got) == t.entries
            assert core_pb2.CommitmentPayload.FromString(got[-1].payload).outcome_positive is False
            assert (await bob.get_session(s.session_id)).metadata.state == RESOLVED
            await stream.close()
        finally:
            for c in (coord, alice, bob):
                await c.close()

    asyncio.run(main())


def test_active_stream(agent):
    """Envelopes sent on the SDK's bidirectional stream are processed like
    Send; the stream echoes accepted ones and reports rejections inline."""
    from macp.modes.decision.v1 import decision_pb2
    from macp_sdk import build_commitment_payload, build_envelope, build_session_start_payload

    coord = agent("coordinator")
    s = DecisionSession(coord)
    stream = s.open_stream()
    errors: list = []
    stream.on_inline_error(errors.append)

    def envelope(message_type: str, payload) -> envelope_pb2.Envelope:
        return build_envelope(
            mode=MODE_DECISION, message_type=message_type, session_id=s.session_id,
            sender="coordinator", payload=payload.SerializeToString(),
        )

    start = envelope(
        "SessionStart", build_session_start_payload(intent="x", participants=["coordinator"], ttl_ms=TTL_MS)
    )
    early_vote = envelope("Vote", decision_pb2.VotePayload(proposal_id="p1", vote="APPROVE"))
    proposal = envelope("Proposal", decision_pb2.ProposalPayload(proposal_id="p1", option="yes"))
    commit = envelope(
        "Commitment", build_commitment_payload(action="decision.selected", authority_scope="x", reason="ok")
    )
    try:
        for env in (start, early_vote, proposal, commit):
            stream.send(env)
        got = list(stream.responses(timeout=TIMEOUT_S))
    finally:
        stream.close()
    assert [e.message_id for e in got] == [start.message_id, proposal.message_id, commit.message_id]
    assert [(x.code, x.message_id) for x in errors] == [("INVALID_ENVELOPE", early_vote.message_id)]
    assert coord.get_session(s.session_id).metadata.state == RESOLVED


def _majority_policy(schema_version: int | None):
    import uuid

    from macp_sdk.policy import VotingRules, build_decision_policy

    kwargs = {} if schema_version is None else {"schema_version": schema_version}
    return build_decision_policy(
        f"policy.interop.majority.{uuid.uuid4().hex[:12]}",
        "majority vote, from the SDK's policy builder",
        voting=VotingRules(algorithm="majority", threshold=0.5),
        **kwargs,
    )


def test_governance_policy(agent, subscribe):
    """A policy built with the SDK's builder, registered through the SDK and
    bound at SessionStart: a failed vote denies a positive commitment
    (POLICY_DENIED with reasons) and allows the negative one."""
    coord, alice, bob, carol = (agent(n) for n in ("coordinator", "alice", "bob", "carol"))
    policy = _majority_policy(schema_version=2)
    reg = coord.register_policy(policy)
    assert reg.ok, reg.error
    assert coord.get_policy(policy.policy_id).policy_descriptor.policy_id == policy.policy_id

    participants = ["coordinator", "alice", "bob", "carol"]
    s = DecisionSession(coord, policy_version=policy.policy_id)
    t = Transcript(s.session_id)
    t.add(s.start(intent="x", participants=participants, ttl_ms=TTL_MS), "SessionStart", "coordinator")
    live = subscribe(alice, s.session_id)
    t.add(s.propose("p1", "rewrite it"), "Proposal", "coordinator")
    for client, vote in ((alice, "APPROVE"), (bob, "REJECT"), (carol, "REJECT")):
        name = client.auth.sender
        voter = DecisionSession(client, session_id=s.session_id, policy_version=policy.policy_id)
        t.add(voter.vote("p1", vote), "Vote", name)
    with pytest.raises(MacpAckError) as e:
        s.commit(action="decision.selected", authority_scope="x", reason="overrule")
    assert e.value.failure.code == "POLICY_DENIED"
    assert e.value.reasons
    # The SDK parses the structured denials (code, message, participants).
    assert [d.code for d in e.value.denials] == ["threshold_not_met"]
    assert e.value.denials[0].message == e.value.reasons[0]
    assert set(e.value.denials[0].participants) == {"bob", "carol"}
    ack = s.commit(action="decision.rejected", authority_scope="x", reason="vote failed")
    t.add(ack, "Commitment", "coordinator", RESOLVED)
    assert triples(live.until_end()) == t.entries
    md = coord.get_session(s.session_id).metadata
    assert md.state == RESOLVED and md.policy_version == policy.policy_id


def test_policy_schema_version_3(agent):
    """The SDK builder's default, schema_version 3, registers, and its
    fail-closed empty tally (RFC-MACP-0012 §4.1) denies a positive commitment
    before any decisive vote, reported as the structured denial no_votes."""
    coord, alice = agent("coordinator"), agent("alice")
    policy = _majority_policy(schema_version=None)
    assert policy.schema_version == 3
    reg = coord.register_policy(policy)
    assert reg.ok, reg.error
    s = DecisionSession(coord, policy_version=policy.policy_id)
    s.start(intent="x", participants=["coordinator", "alice"], ttl_ms=TTL_MS)
    s.propose("p1", "ship it")
    with pytest.raises(MacpAckError) as e:
        s.commit(action="decision.selected", authority_scope="x", reason="nobody voted")
    assert [d.code for d in e.value.denials] == ["no_votes"]
    DecisionSession(alice, session_id=s.session_id, policy_version=policy.policy_id).vote("p1", "APPROVE")
    ack = s.commit(action="decision.selected", authority_scope="x", reason="one decisive approval")
    assert ack.ok


def _decision_policy(label: str, **kwargs):
    """`build_decision_policy` with a fresh id; every other argument is the
    builder's default unless given."""
    import uuid

    from macp_sdk.policy import build_decision_policy

    return build_decision_policy(
        f"policy.interop.{label}.{uuid.uuid4().hex[:12]}", f"{label}, from the SDK's policy builder", **kwargs
    )


def _split_vote(coord, alice, bob, policy_id: str) -> DecisionSession:
    """A Decision session bound to `policy_id`: the coordinator proposes,
    alice approves, bob rejects (history entries 0-3)."""
    s = DecisionSession(coord, policy_version=policy_id)
    s.start(intent="x", participants=["coordinator", "alice", "bob"], ttl_ms=TTL_MS)
    s.propose("p1", "ship it")
    DecisionSession(alice, session_id=s.session_id, policy_version=policy_id).vote("p1", "APPROVE")
    DecisionSession(bob, session_id=s.session_id, policy_version=policy_id).vote("p1", "REJECT")
    return s


def test_default_decision_policy_and_what_if_replay(agent):
    """`build_decision_policy()` with every default (schema_version 3, no
    voting algorithm, initiator-only commitment) registers and is enforced;
    then the SDK's `what_if_replay` on the resolved session: a stricter
    (unanimous) candidate diverges at the Commitment with a structured
    POLICY_DENIED, the recorded policy shows no divergence, and nothing is
    registered."""
    from macp.v1 import policy_pb2
    from macp_sdk.errors import parse_error_details
    from macp_sdk.policy import VotingRules

    coord, alice, bob = agent("coordinator"), agent("alice"), agent("bob")
    init = coord.initialize()
    assert init.capabilities.policy_registry.what_if_replay
    policy = _decision_policy("defaults")
    assert policy.schema_version == 3
    reg = coord.register_policy(policy)
    assert reg.ok, reg.error
    s = _split_vote(coord, alice, bob, policy.policy_id)
    with pytest.raises(MacpAckError) as e:
        DecisionSession(alice, session_id=s.session_id, policy_version=policy.policy_id).commit(
            action="decision.selected", authority_scope="x", reason="not alice's call"
        )
    assert e.value.failure.code == "FORBIDDEN", "commitment.authority initiator_only is enforced"
    ack = s.commit(action="decision.selected", authority_scope="x", reason="the initiator decides")
    assert ack.ok and ack.session_state == RESOLVED
    assert coord.get_session(s.session_id).metadata.policy_version == policy.policy_id

    Kind = policy_pb2.WhatIfEntryOutcome
    stricter = _decision_policy("unanimous", voting=VotingRules(algorithm="unanimous"))
    r = bob.what_if_replay(s.session_id, stricter)
    assert (r.recorded_policy_id, r.candidate_policy_id) == (policy.policy_id, stricter.policy_id)
    assert [e.message_type for e in r.entries] == ["SessionStart", "Proposal", "Vote", "Vote", "Commitment"]
    assert r.HasField("first_divergence") and r.first_divergence == 4
    commit = r.entries[4]
    assert commit.recorded.kind == Kind.KIND_APPLIED and commit.recorded.state == RESOLVED
    assert commit.candidate.kind == Kind.KIND_REFUSED and commit.candidate.error_code == "POLICY_DENIED"
    assert [d.code for d in parse_error_details(commit.candidate.details).denials] == ["threshold_not_met"]
    assert [(d.history_index, d.message_id) for d in r.denials] == [(4, commit.message_id)]
    assert r.recorded.state == RESOLVED and r.recorded.resolved_by_message_id == commit.message_id
    assert r.candidate.state == OPEN and not r.candidate.resolution

    recorded = coord.get_policy(policy.policy_id).policy_descriptor
    r = coord.what_if_replay(s.session_id, recorded)
    assert not r.HasField("first_divergence")
    assert not r.denials
    assert all(e.recorded == e.candidate for e in r.entries)
    assert r.candidate.state == RESOLVED

    listed = {d.policy_id for d in coord.list_policies().descriptors}
    assert policy.policy_id in listed and stricter.policy_id not in listed, "a candidate is never registered"
    with pytest.raises(MacpTransportError) as e:
        agent("outsider").what_if_replay(s.session_id, stricter)
    assert e.value.macp_code == "FORBIDDEN"


READONLY_POLICY_ID = "policy.interop.files.unanimous"  # tests/interop/policies/unanimous.json


@pytest.mark.readonly
def test_read_only_registry(agent):
    """A runtime started with a policies directory serves the file's policy,
    enforces it, advertises register_policy = false, and refuses the SDK's
    `register_policy` and `unregister_policy` with REGISTRY_READ_ONLY."""
    from macp_sdk import REGISTRY_READ_ONLY

    coord, alice, bob = agent("coordinator"), agent("alice"), agent("bob")
    caps = coord.initialize().capabilities.policy_registry
    assert not caps.register_policy and caps.list_policies
    assert READONLY_POLICY_ID in {d.policy_id for d in coord.list_policies().descriptors}
    assert coord.get_policy(READONLY_POLICY_ID).policy_descriptor.schema_version == 3

    with pytest.raises(MacpAckError) as e:
        coord.register_policy(_decision_policy("adhoc"))
    assert e.value.failure.code == "FAILED_PRECONDITION"
    assert e.value.macp_code == REGISTRY_READ_ONLY
    with pytest.raises(MacpAckError) as e:
        coord.unregister_policy(READONLY_POLICY_ID)
    assert e.value.failure.code == "FAILED_PRECONDITION"
    assert e.value.macp_code == REGISTRY_READ_ONLY
    assert READONLY_POLICY_ID in {d.policy_id for d in coord.list_policies().descriptors}

    s = _split_vote(coord, alice, bob, READONLY_POLICY_ID)
    with pytest.raises(MacpAckError) as e:
        s.commit(action="decision.selected", authority_scope="x", reason="split vote")
    assert [d.code for d in e.value.denials] == ["threshold_not_met"], "the file's unanimity is enforced"


def test_agent_framework(agent):
    """The SDK's agent loop (macp_sdk.agent.Participant): three agents in
    threads, each following the session over its own subscribe stream and
    reacting to it, drive a decision to a Commitment."""
    import threading
    import uuid

    from macp_sdk.agent import (
        CommitmentResult,
        EvaluationResult,
        InitiatorConfig,
        Participant,
        commitment_handler,
        evaluation_handler,
        function_committer,
        function_evaluator,
        majority_voter,
        voting_handler,
    )

    session_id = str(uuid.uuid4())
    participants = ["coordinator", "alice", "bob"]

    def participant(name: str, **kwargs) -> Participant:
        return Participant(
            participant_id=name, session_id=session_id, mode=MODE_DECISION, client=agent(name),
            participants=participants, **kwargs,
        )

    coordinator = participant(
        "coordinator",
        initiator_config=InitiatorConfig(
            intent="ship it?", participants=participants, ttl_ms=TTL_MS,
            kickoff_message_type="Proposal", kickoff_payload={"proposal_id": "p1", "option": "ship"},
        ),
    )
    coordinator.on("Vote", commitment_handler(function_committer(
        lambda p: p.vote_totals().get("p1", 0) >= 2,
        lambda p: CommitmentResult(action="decision.selected", authority_scope="release", reason="2 approvals"),
    )))
    alice, bob = participant("alice"), participant("bob")
    alice.on("Proposal", evaluation_handler(function_evaluator(
        lambda proposal, info: EvaluationResult(recommendation="APPROVE", confidence=0.8, reason="looks fine"),
    )))
    for p in (alice, bob):
        p.on("Evaluation", voting_handler(majority_voter()))

    results: dict[str, object] = {}
    failures: list[BaseException] = []
    for p in (coordinator, alice, bob):
        p.on_terminal(lambda result, name=p.participant_id: results.__setitem__(name, result))

    def run(p: Participant) -> None:
        try:
            p.run()
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(p,), daemon=True) for p in (coordinator, alice, bob)]
    for th in threads:  # the coordinator first; the others retry NOT_FOUND until SessionStart lands
        th.start()
    for th in threads:
        th.join(timeout=3 * TIMEOUT_S)
    for p in (coordinator, alice, bob):
        p.stop()
    assert failures == []
    assert not any(th.is_alive() for th in threads), "an agent loop did not finish"
    assert sorted(results) == sorted(participants)
    for result in results.values():
        assert result.state == "Committed"
        assert result.commitment.action == "decision.selected"
    md = agent("bob").get_session(session_id).metadata
    assert md.state == RESOLVED
    assert {a.participant_id: a.message_count for a in md.participant_activity} == {
        "coordinator": 3, "alice": 2, "bob": 1,
    }
