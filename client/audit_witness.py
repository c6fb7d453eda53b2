"""The audit trail against its witness: what the coordinator received.

**What a local check cannot catch, and the witness that can.** Whoever can rewrite both
files of a trail and recompute every hash (or append a record and rewrite the head to
match) can forge it, and no check on the hospital's machine alone can tell. So every
sealed reply carries, signed, the head of the trail when it was built (``seq`` and
``hash`` of the last record before it, which is the ``prev`` of the record appended for
that very reply), and the coordinator records it with the SHA-256 of the content it
received (:mod:`fedtune.security.witness`). :func:`check_witness` (``fedtune client audit
verify LOG --witness FILE``) then requires each witnessed message's record to follow the
head the coordinator saw and carry the content hash it saw, and fails on records after the
last witnessed one: a rewritten trail, or one extended with a forged record even with the
head file rewritten to match, no longer verifies. Limits: SecAgg+ stage messages and error
replies are Flower's own and unsealed, so they carry no head; they are anchored by the
next sealed reply only, and until then (at the end of a trail) they are reported as not
witnessed. The last witnessed record's own time and epsilon are anchored by the next
sealed reply. The check assumes one message at a time per trail (what a fedtune hospital
does): the head read when a reply is built is then exactly the ``prev`` of its record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedtune.client.audit_format import GENESIS
from fedtune.security.witness import Witness, WitnessEntry


@dataclass(frozen=True)
class WitnessVerdict:
    """``check_witness``'s answer: how many records the coordinator vouches for, up to which."""

    witnessed: int
    last: int  # seq of the last witnessed record (0: none)
    bad: int = 0
    reason: str = ""
    uncovered: int = 0  # records after ``last`` of runs the witness does not cover (not judged)

    @property
    def ok(self) -> bool:
        return self.bad == 0


def check_witness(records: list[dict[str, Any]], witness: Witness) -> WitnessVerdict:
    """Check a trail's ``records`` against what the coordinator received (after ``verify`` passed).

    Each witnessed message's record must follow the head the coordinator saw in its
    envelope (record ``audit_seq`` has hash ``audit_head``, so the next one's ``prev``
    is that head) and carry the run, round, kind, SHA-256 and size the coordinator saw;
    records after the last witnessed one, in the runs the witness covers (every run
    when ``all_runs``), are not witnessed and fail.
    """
    witnessed: set[int] = set()
    for entry in sorted(witness.entries, key=lambda e: e.audit_seq):
        failed = _entry_fails(records, entry)
        if failed is not None:
            return WitnessVerdict(len(witnessed), max(witnessed, default=0), *failed)
        witnessed.add(entry.audit_seq + 1)
    last = max(witnessed, default=0)
    covered = set(witness.runs)
    after = records[last:]
    judged = [r for r in after if witness.all_runs or r.get("run") in covered]
    if judged:
        first, end = int(judged[0]["seq"]), int(judged[-1]["seq"])
        runs = ", ".join(sorted({str(r.get("run")) for r in judged}))
        which = f"record {first} (run {runs}) is" if first == end else f"records {first} to {end} (run {runs}) are"
        reason = (
            f"{which} not witnessed: the coordinator's last "
            f"witnessed record is {last}; they were added after the last message it received (forged?), "
            "or are unsealed messages (SecAgg+ stages, errors) not yet followed by a sealed reply, or the "
            "witness file is older than them"
        )
        return WitnessVerdict(len(witnessed), last, first, reason, len(after) - len(judged))
    return WitnessVerdict(len(witnessed), last, 0, "", len(after))


def _entry_fails(records: list[dict[str, Any]], entry: WitnessEntry) -> tuple[int, str] | None:
    """The 1-based number of the record that differs from what the coordinator saw, and why (None: none)."""
    count = len(records)
    what = f"the {entry.kind} reply of run {entry.run} round {entry.round}"
    s = entry.audit_seq
    if s >= count:
        reason = (
            f"is missing: the coordinator received {what}, built after record {s}, but the trail has "
            f"{count} records (truncated?)"
        )
        return s + 1, reason
    if (records[s - 1]["hash"] if s else GENESIS) != entry.audit_head:
        return s, f"differs from the record {what} named as the trail's head when it was sent (rewritten)"
    record = records[s]
    wants = {"sha256": entry.sha256, "bytes": entry.bytes, "run": entry.run}
    wants |= {"round": entry.round, "kind": entry.kind}
    differ = [f for f, want in wants.items() if record.get(f) != want]
    if differ:
        return s + 1, f"is not {what} as the coordinator received it ({', '.join(differ)} differ)"
    return None
