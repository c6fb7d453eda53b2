"""The hospital's release gate: whether it adopts a round's global adapter for its own use.

After the hospital evaluates a global adapter for the coordinator (``client_app.evaluate``),
a real hospital with ``[release] enabled`` judges that candidate by its own rule: its
held-out ``release.metric`` no more than ``release.max_drop`` worse than the adapter it
uses now (before the first adoption: than the base model without an adapter, on the same
records), its held-out field accuracy not below ``release.min_metric``, and, with
``release.max_audit_auc`` > 0, the membership-inference audit's AUC (point estimate) on
its training against its held-out records not above that bound. An accepted candidate
becomes the adopted adapter; every decision is appended to the history
(:mod:`fedtune.client.release_store`). Nothing of it is sent: the eval reply is built
from the evaluation alone, before and whatever the gate decides, and an error inside the
gate is one ERROR line in the hospital's log.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fedtune.client.hospital import HospitalConfig, ReleasePolicy
from fedtune.client.release_store import ReleaseStore
from fedtune.data.records import dataset_hash
from fedtune.errors import FedTuneError
from fedtune.evaluate import EvalResult
from fedtune.lora import adapter

if TYPE_CHECKING:
    from fedtune.client.site import Site
    from fedtune.privacy.audit import MembershipAudit


@dataclass(frozen=True)
class Measured:
    """Held-out scores of one model: a candidate, the adopted adapter or the base model."""

    field_accuracy: float
    loss: float
    label: str = ""  # how a reason names it: "the adopted adapter's", "the base model's"

    @classmethod
    def of(cls, result: EvalResult, label: str = "") -> Measured:
        return cls(result.metric, result.loss, label)

    def as_dict(self) -> dict[str, Any]:
        return {"field_accuracy": self.field_accuracy, "loss": self.loss}


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    rule: str  # the `release.<field>` that rejected ("" when accepted)
    reason: str


def judge(policy: ReleasePolicy, candidate: Measured, current: Measured) -> Verdict:
    """The utility rule: the floor, then the drop against what the hospital uses now."""
    fa, loss = candidate.field_accuracy, candidate.loss
    if not (math.isfinite(fa) and math.isfinite(loss)):
        return Verdict(False, "release.metric", f"no held-out score (field accuracy {fa}, loss {loss})")
    if fa < policy.min_metric:
        why = f"held-out field accuracy {fa:.3f} is below release.min_metric = {policy.min_metric:g}"
        return Verdict(False, "release.min_metric", why)
    bound = f"release.max_drop = {policy.max_drop:g}"
    if policy.metric == "loss":
        rise = loss - current.loss
        if rise > policy.max_drop:
            why = f"held-out loss {loss:.3f} is {rise:.3f} above {current.label} {current.loss:.3f} ({bound})"
            return Verdict(False, "release.max_drop", why)
        return Verdict(True, "", f"held-out loss {loss:.3f} against {current.label} {current.loss:.3f} ({bound})")
    now = current.field_accuracy
    drop = now - fa
    if drop > policy.max_drop:
        why = f"held-out field accuracy {fa:.3f} is {drop:.3f} below {current.label} {now:.3f} ({bound})"
        return Verdict(False, "release.max_drop", why)
    said = f"held-out field accuracy {fa:.3f} against {current.label} {now:.3f} ({bound})"
    return Verdict(True, "", said)


def judge_audit(policy: ReleasePolicy, audit: MembershipAudit, utility: Verdict) -> Verdict:
    """The audit rule: reject when the AUC's point estimate is above ``release.max_audit_auc``."""
    said = (
        f"membership-inference AUC {audit.auc:.3f} (interval {audit.auc_low:.3f}-{audit.auc_high:.3f}; "
        f"{audit.members} training vs {audit.nonmembers} held-out records)"
    )
    if audit.auc > policy.max_audit_auc:
        return Verdict(
            False, "release.max_audit_auc", f"{said} is above release.max_audit_auc = {policy.max_audit_auc:g}"
        )
    return Verdict(True, "", f"{utility.reason}; {said} <= release.max_audit_auc = {policy.max_audit_auc:g}")


def adapter_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """Content hash of an adapter: names, shapes and float32 bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}|{tuple(t.shape)}\n".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def heldout_key(site: Site) -> str:
    """What a held-out score depends on besides the model: the records and how they are scored."""
    spec = {
        "records": dataset_hash(site.data.eval),
        "max_new_tokens": site.cfg.eval.max_new_tokens,
        "max_length": site.cfg.train.max_length,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


Say = Callable[[str, str], None]  # (level name, message): the daemon's log


def _flower_log(level: str, message: str) -> None:
    from flwr.supercore import log

    log(logging.getLevelNamesMapping()[level], "%s", message)


def consider(
    site: Site,
    server_round: int,
    candidate: Mapping[str, torch.Tensor],
    result: EvalResult,
    say: Say | None = None,
) -> None:
    """The gate's decision on ``candidate`` (evaluated as ``result``), at a real hospital with the
    gate on; never raises: an error is one ERROR line and the adopted adapter stays as it was.
    ``say``: the daemon's log (Flower's log when None)."""
    hospital = site.hospital
    if hospital is None or not hospital.release.enabled:
        return
    say = say or _flower_log
    try:
        _decide(site, hospital, server_round, dict(candidate), result, say)
    except Exception as err:  # the gate must never break the federation
        said = " ".join(str(err).split()) or type(err).__name__
        state = _state_after_failure(ReleaseStore(hospital.release_dir), candidate)
        say("ERROR", f"release gate failed on run {site.run_id} round {server_round} ({state}): {said}")


def _state_after_failure(store: ReleaseStore, candidate: Mapping[str, torch.Tensor]) -> str:
    """What a failure left: the previous adopted adapter, or this one adopted without its decision line."""
    try:
        adopted = store.adopted()
        committed = adopted is not None and adopted.get("sha256") == adapter_sha256(candidate)
    except Exception:  # noqa: BLE001 - the state itself is what failed: say nothing more about it
        committed = False
    return "it was adopted, but its decision is not in the history" if committed else "the adopted adapter is unchanged"


def _decide(
    site: Site,
    hospital: HospitalConfig,
    server_round: int,
    candidate: dict[str, torch.Tensor],
    result: EvalResult,
    say: Say,
) -> None:
    policy, store = hospital.release, ReleaseStore(hospital.release_dir)
    name = f"run {site.run_id} round {server_round}"
    sha = adapter_sha256(candidate)
    adopted = store.adopted()
    if adopted is not None and adopted.get("sha256") == sha:
        say("INFO", f"release gate: {name} is the adopted adapter already")
        return
    current = current_scores(site, store, adopted, say)
    scored = Measured.of(result)
    verdict = judge(policy, scored, current)
    audit = None
    if verdict.accepted and policy.max_audit_auc > 0:
        audit = run_audit(site, candidate, policy)
        verdict = judge_audit(policy, audit, verdict)
    decision = {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "run": site.run_id,
        "round": server_round,
        "sha256": sha,
        "metric": policy.metric,
        "candidate": scored.as_dict(),
        "current": {**current.as_dict(), "label": current.label},
        "audit": audit.as_dict() if audit is not None else None,
        "decision": "accepted" if verdict.accepted else "rejected",
        "rule": verdict.rule,
        "reason": verdict.reason,
    }
    if not verdict.accepted:
        store.record(decision)
        kept = (
            f"run {adopted['run']} round {adopted['round']}" if adopted else "the base model (no adapter adopted yet)"
        )
        say("WARNING", f"release gate rejected {name}: {verdict.reason}; keeping {kept}")
        return
    folder = _adopt(site, store, decision, candidate, result)
    store.record(decision)
    say("INFO", f"release gate adopted {name}: {verdict.reason} ({folder})")


def _adopt(
    site: Site, store: ReleaseStore, decision: dict[str, Any], candidate: dict[str, torch.Tensor], result: EvalResult
) -> Path:
    """Write the accepted candidate as the adopted adapter (PEFT folder, then its record: the commit)."""
    runtime = site.runtime
    record = {
        **{k: decision[k] for k in ("time", "run", "round", "sha256", "audit")},
        "base_sha256": runtime.base.sha256,
        "heldout": heldout_key(site),
        "metrics": {**decision["candidate"], "exact": result.exact, "n": result.n},
    }
    return store.adopt(
        record,
        lambda out: adapter.export_peft(
            out, candidate, runtime.lora, base_model_path=str(runtime.base.path), base_sha256=runtime.base.sha256
        ),
    )


def current_scores(site: Site, store: ReleaseStore, adopted: dict[str, Any] | None, say: Say = _flower_log) -> Measured:
    """What the hospital uses now, scored on its held-out records as they are now: the adopted
    adapter (scored again when the records or their scoring changed), else the base model."""
    key, runtime = heldout_key(site), site.runtime
    if adopted is None:
        return _base_scores(site, store, key)
    label = "the adopted adapter's"
    if adopted.get("heldout") == key:
        metrics = adopted["metrics"]
        return Measured(float(metrics["field_accuracy"]), float(metrics["loss"]), label)
    try:  # the held-out records or how they are scored changed since it was adopted
        state, meta = adapter.read_exported(store.adapter_dir(adopted))
        adapter.check_base(meta.get(adapter.META_BASE, ""), runtime.base.sha256, what="the adopted adapter")
        again = runtime.evaluate(state, site.data, site.cfg.eval)
    except FedTuneError as err:  # another base or adapter shape: its score on the earlier records stands
        metrics = adopted["metrics"]
        say("WARNING", f"release gate: the adopted adapter cannot be scored again on these held-out records ({err})")
        stale = f"{label} (scored on earlier held-out records)"
        return Measured(float(metrics["field_accuracy"]), float(metrics["loss"]), stale)
    metrics = {**adopted["metrics"], **Measured.of(again).as_dict(), "exact": again.exact, "n": again.n}
    store.update_adopted({**adopted, "heldout": key, "metrics": metrics})
    return Measured.of(again, label)


def _base_scores(site: Site, store: ReleaseStore, heldout: str) -> Measured:
    """The base model's held-out scores (no adapter), measured once per base model and held-out set."""
    base = site.runtime.base.sha256
    key = hashlib.sha256(f"{heldout}|{base}".encode()).hexdigest()
    label = "the base model's"
    found = store.baseline(key)
    if found is not None:
        return Measured(float(found["field_accuracy"]), float(found["loss"]), label)
    result = site.runtime.evaluate(None, site.data, site.cfg.eval)
    store.set_baseline({"key": key, "base_sha256": base, **Measured.of(result).as_dict(), "n": result.n})
    return Measured.of(result, label)


def run_audit(site: Site, candidate: Mapping[str, torch.Tensor], policy: ReleasePolicy) -> MembershipAudit:
    """The membership-inference audit of ``candidate``: this hospital's training records (members)
    against its held-out records, at most ``release.audit_members`` of each, drawn with a fixed seed."""
    from fedtune.privacy.audit import membership_audit

    runtime = site.runtime
    adapter.set_state(runtime.model, candidate)
    return membership_audit(
        runtime.model,
        _sample(site.data.train_tokens, policy.audit_members),
        _sample(site.data.eval_tokens, policy.audit_members),
        pad_id=int(runtime.base.tokenizer.pad_token_id),
        batch_size=site.cfg.eval.batch_size,
        precision=runtime.settings.precision,
        seed=0,
    )


def _sample(items: Sequence[Any], n: int) -> list[Any]:
    return list(items) if len(items) <= n else random.Random(0).sample(list(items), n)
