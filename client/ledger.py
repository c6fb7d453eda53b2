"""The hospital's privacy ledger: every DP release of every dataset, durable, per record.

One JSON file (0600) holds the policy (budget, delta, accountant) and, per dataset (the
set of its training records, by content), every release: its mechanism (noise
multiplier, sample rate, steps), run, round and time. Each dataset's record digests sit
beside it in ``<ledger>.records/<dataset>.digests`` (written once, immutable).

Epsilon is per record, over everything ever released: a record's spend composes every
release of every dataset that contains it, and a dataset's epsilon is that of its worst
record. So a dataset that changes (a new record, a re-split) is a new entry, yet its old
records keep what they already spent. The whole history is composed again on every
question (Opacus's accountants), so restarts, new runs and several processes sharing
the file never reset or lose spend. A release is recorded (atomic write + fsync) before
its update leaves the hospital; every release counts, a retried round included.

This module handles the files; the accounting is :mod:`fedtune.client.ledger_accounting`,
the format :mod:`fedtune.client.ledger_format`, and the check that a ledger is not an older
copy :mod:`fedtune.client.ledger_rollback`.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedtune.atomic import atomic_write_bytes
from fedtune.client.ledger_accounting import record_histories, report_rows, worst_epsilon
from fedtune.client.ledger_format import DIGEST_BYTES, LEDGER_VERSION, parse_ledger, release_mechanism, split_digests
from fedtune.data.records import dataset_id
from fedtune.errors import ConfigError, PrivacyError
from fedtune.privacy.accounting import BudgetExceeded, Mechanism, check_accounting


@dataclass(frozen=True)
class Policy:
    """What the hospital allows: ``budget_epsilon`` per record at ``delta``, by ``accountant``."""

    budget_epsilon: float
    delta: float
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        check_accounting(delta=self.delta, accountant=self.accountant)
        if not (isinstance(self.budget_epsilon, int | float) and self.budget_epsilon > 0):
            raise ConfigError(f"`budget_epsilon` must be positive, got {self.budget_epsilon!r}")


def _default_clock() -> datetime:
    return datetime.now(UTC)


def _check_private(path: Path, what: str) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise PrivacyError(
            f"{what} {path} has mode {oct(mode)}, open to other users; run `chmod {'700' if path.is_dir() else '600'} "
            f"{path}`"
        )


class PrivacyLedger:
    """Cumulative per-record (epsilon, delta) of a hospital's datasets, durable in ``path``.

    The file is the truth: every query re-reads it and every write happens under an
    exclusive lock after re-reading, so processes sharing the ledger never lose spend.
    """

    def __init__(self, path: Path, policy: Policy, *, clock: Callable[[], datetime] = _default_clock) -> None:
        self.path = Path(path)
        self.policy = policy
        self._clock = clock
        self._datasets: dict[str, dict[str, Any]] = {}
        self._digest_cache: dict[str, frozenset[bytes]] = {}
        self._refresh()

    @classmethod
    def open(cls, path: Path) -> PrivacyLedger:
        """Open an existing ledger with the policy stored in it (for reading and reports)."""
        path = Path(path)
        if not path.is_file():
            raise PrivacyError(f"no privacy ledger at {path}; check the path (it is created by the first DP round)")
        _check_private(path, "privacy ledger")
        try:
            stored = json.loads(path.read_bytes()).get("policy", {})
            policy = Policy(float(stored["budget_epsilon"]), float(stored["delta"]), str(stored["accountant"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, ConfigError) as err:
            raise PrivacyError(
                f"privacy ledger {path}: `policy` is unreadable ({err}); restore it from backup"
            ) from err
        return cls(path, policy)

    # -- files ------------------------------------------------------------------------
    @property
    def records_dir(self) -> Path:
        return self.records_path(self.path)

    @staticmethod
    def records_path(ledger: Path) -> Path:
        """The folder of each dataset's record digests, beside the ledger (back it up with it)."""
        return Path(ledger).with_name(Path(ledger).name + ".records")

    def _digests_path(self, dataset: str) -> Path:
        return self.records_dir / f"{dataset}.digests"

    def _refresh(self) -> None:
        if not self.path.exists():
            if any(d["releases"] for d in self._datasets.values()):
                raise PrivacyError(
                    f"privacy ledger {self.path} vanished after spend was recorded; restore it from backup"
                )
            return
        _check_private(self.path, "privacy ledger")
        try:
            state = json.loads(self.path.read_bytes())
        except (OSError, ValueError) as err:
            raise PrivacyError(f"privacy ledger {self.path} is unreadable ({err}); restore it from backup") from err
        self._datasets = parse_ledger(state, f"privacy ledger {self.path}")

    def _write(self) -> None:
        state = {
            "version": LEDGER_VERSION,
            "policy": {
                "budget_epsilon": self.policy.budget_epsilon,
                "delta": self.policy.delta,
                "accountant": self.policy.accountant,
            },
            "datasets": self._datasets,
        }
        atomic_write_bytes(self.path, (json.dumps(state, indent=1, sort_keys=True) + "\n").encode(), mode=0o600)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path(self.path), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._refresh()
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _digests(self, dataset: str) -> frozenset[bytes]:
        if dataset in self._digest_cache:
            return self._digest_cache[dataset]
        path = self._digests_path(dataset)
        try:
            _check_private(path, "record digests")
            raw = path.read_bytes()
        except OSError as err:
            raise PrivacyError(
                f"record digests of dataset {dataset[:12]} are missing ({path}); restore the ledger's "
                f"`{self.records_dir.name}` folder from backup"
            ) from err
        digests = split_digests(raw)
        if len(raw) % DIGEST_BYTES or dataset_id(digests) != dataset:
            raise PrivacyError(f"{path} does not match dataset {dataset[:12]}; restore it from backup")
        self._digest_cache[dataset] = frozenset(digests)
        return self._digest_cache[dataset]

    # -- datasets ---------------------------------------------------------------------
    def register(self, digests: Sequence[bytes], *, label: str = "") -> str:
        """Make a dataset (its training records' digests) known; return its id. Idempotent."""
        if not digests or any(len(d) != DIGEST_BYTES for d in digests):
            raise ConfigError(f"`digests` must be non-empty {DIGEST_BYTES}-byte SHA-256 digests")
        dataset = dataset_id(digests)
        with self._locked():
            if dataset in self._datasets:
                return dataset
            self.records_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            atomic_write_bytes(self._digests_path(dataset), b"".join(sorted(set(digests))), mode=0o600)
            self._datasets[dataset] = {
                "label": label,
                "records": len(set(digests)),
                "registered": self._clock().isoformat(),
                "releases": [],
            }
            self._write()
        return dataset

    def _known(self, dataset: str) -> dict[str, Any]:
        if dataset not in self._datasets:
            raise PrivacyError(f"dataset {dataset[:12]} is not registered in {self.path}; register it first")
        return self._datasets[dataset]

    def _worst(self, dataset: str, extra: Mechanism | None = None) -> float:
        self._known(dataset)
        histories = record_histories(self._datasets, dataset, self._digests)
        return worst_epsilon(histories, delta=self.policy.delta, accountant=self.policy.accountant, extra=extra)

    # -- queries ----------------------------------------------------------------------
    def spent(self, dataset: str) -> float:
        """Epsilon (at the policy's delta) of the dataset's worst record over everything released."""
        self._refresh()
        return self._worst(dataset)

    def remaining(self, dataset: str) -> float:
        """Epsilon left before the budget is reached (never negative)."""
        return max(self.policy.budget_epsilon - self.spent(dataset), 0.0)

    def check(self, dataset: str, mechanism: Mechanism) -> float:
        """Epsilon ``dataset`` would have after ``mechanism``; raise BudgetExceeded if over budget."""
        self._refresh()
        return self._check_loaded(dataset, mechanism)

    def _check_loaded(self, dataset: str, mechanism: Mechanism) -> float:
        spent = self._worst(dataset)
        after = self._worst(dataset, mechanism)
        if after > self.policy.budget_epsilon:
            label = self._datasets[dataset]["label"]
            raise BudgetExceeded(
                f"privacy budget: dataset {dataset[:12]}{f' ({label})' if label else ''} has spent epsilon "
                f"{spent:.3f} of `budget_epsilon` = {self.policy.budget_epsilon:g} (delta {self.policy.delta:g}); "
                f"this round (noise {mechanism.noise_multiplier:.3g}, rate {mechanism.sample_rate:.3g}, "
                f"{mechanism.steps} steps) would bring it to {after:.3f}; nothing was sent; stop training on this "
                "dataset, or have the privacy board raise the budget",
                spent=spent,
                after=after,
                budget=self.policy.budget_epsilon,
            )
        return after

    def record(self, dataset: str, mechanism: Mechanism, *, release_id: str, run_id: str, server_round: int) -> float:
        """Check, append and durably write one release; return the dataset's new epsilon.

        The same ``release_id`` twice (a repeated write of one release) counts once; every
        new release counts, even for a round already recorded: a re-run round released
        new noise on the same records.
        """
        for name, value in (("release_id", release_id), ("run_id", run_id)):
            if not isinstance(value, str) or not value:
                raise ConfigError(f"`{name}` must be a non-empty string, got {value!r}")
        if isinstance(server_round, bool) or not isinstance(server_round, int) or server_round < 0:
            raise ConfigError(f"`server_round` must be an integer >= 0, got {server_round!r}")
        with self._locked():
            releases = self._known(dataset)["releases"]
            for r in releases:
                if r["release"] == release_id:
                    if release_mechanism(r) != mechanism:
                        raise PrivacyError(f"release `{release_id}` is already recorded with a different mechanism")
                    return self._worst(dataset)
            after = self._check_loaded(dataset, mechanism)
            releases.append(
                {
                    "release": release_id,
                    "time": self._clock().isoformat(),
                    "run_id": run_id,
                    "server_round": server_round,
                    "noise_multiplier": float(mechanism.noise_multiplier),
                    "sample_rate": float(mechanism.sample_rate),
                    "steps": mechanism.steps,
                }
            )
            try:
                self._write()
            except BaseException:
                releases.pop()  # memory must not claim what the disk lacks
                raise
            return after

    def releases(self) -> int:
        """How many releases the ledger holds, over all its datasets (it only ever grows)."""
        self._refresh()
        return sum(len(info["releases"]) for info in self._datasets.values())

    def history(self, dataset: str) -> list[dict[str, Any]]:
        """The dataset's releases, oldest first (copies)."""
        self._refresh()
        return [dict(r) for r in self._known(dataset)["releases"]]

    def report(self) -> list[dict[str, Any]]:
        """One row per dataset: label, records, releases, rounds, runs, own and per-record epsilon, remaining."""
        self._refresh()
        policy = self.policy
        return report_rows(
            self._datasets,
            self._worst,
            budget_epsilon=policy.budget_epsilon,
            delta=policy.delta,
            accountant=policy.accountant,
        )

    # -- state ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything the ledger holds (JSON-ready): datasets with their releases and record digests."""
        self._refresh()
        return {
            "version": LEDGER_VERSION,
            "datasets": json.loads(json.dumps(self._datasets)),
            "digests": {ds: base64.b64encode(b"".join(sorted(self._digests(ds)))).decode() for ds in self._datasets},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the ledger with ``state`` (a backup) and write it durably.

        Refused if ``state`` lacks any release already recorded here: a ledger never forgets spend.
        """
        with self._locked():
            if not isinstance(state, dict):
                raise PrivacyError("`state` must be an object from PrivacyLedger.state_dict()")
            new = parse_ledger({"version": state.get("version"), "datasets": state.get("datasets")}, "`state`")
            for ds, info in self._datasets.items():
                kept = {r["release"] for r in new.get(ds, {}).get("releases", [])}
                missing = [r for r in info["releases"] if r["release"] not in kept]
                if missing:
                    raise PrivacyError(
                        f"`state` lacks {len(missing)} recorded releases of dataset {ds[:12]}; "
                        "a ledger never forgets spend: load a newer state"
                    )
            digests = state.get("digests")
            if not isinstance(digests, dict) or set(digests) != set(new):
                raise PrivacyError("`state` must carry the record digests of every dataset")
            self.records_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            for ds, encoded in digests.items():
                raw = base64.b64decode(encoded)
                if dataset_id(split_digests(raw)) != ds:
                    raise PrivacyError(f"`state`: record digests of dataset {ds[:12]} do not match its id")
                atomic_write_bytes(self._digests_path(ds), raw, mode=0o600)
            self._datasets = new
            self._digest_cache.clear()
            self._write()


def lock_path(ledger: Path) -> Path:
    """The ledger's lock file: held by every write, and by ``fedtune client backup`` while it copies."""
    return Path(ledger).with_name(Path(ledger).name + ".lock")
