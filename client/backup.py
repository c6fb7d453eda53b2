"""``fedtune client backup``: one consistent archive of what a hospital cannot recreate.

What goes in: ``hospital.toml``; the files it names under ``[coordinator]`` and
``[keys]`` (and the public halves beside the private keys); the privacy ledger and its
``.records/`` folder; the audit trail and its head file; ``runs.json`` (which
authorizations were used) and ``connection.json`` (the node key last connected) from
the state folder; the release gate's adopted adapter, its record and its decisions.
Not the data or the model (the hospital's own, backed up as it backs up everything
else), not the daemon's log, not what the daemon makes afresh at every start.

Consistent: the ledger's, the audit trail's and the release state's locks are held while
they are copied (the order the rounds write them in: the ledger first), so the copy is a
state that existed, never a ledger older than the trail beside it nor an adopted adapter's
record without its folder, even while a round runs. The archive is
written 0600 (it holds the private keys), beside its final name and renamed into place;
an existing file is never overwritten. Names inside are relative to the config's folder;
a file outside that folder is stored under ``root/`` with its absolute path.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import tarfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from fedtune.client.audit import AuditLog
from fedtune.client.audit import lock_path as audit_lock
from fedtune.client.hospital import HospitalConfig
from fedtune.client.ledger import PrivacyLedger
from fedtune.client.ledger import lock_path as ledger_lock
from fedtune.client.release_store import ReleaseStore, locked
from fedtune.errors import ConfigError


@contextlib.contextmanager
def _holding(lock: Path) -> Iterator[None]:
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _arcname(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return "root/" + path.as_posix().lstrip("/")


def state_files(cfg: HospitalConfig) -> list[Path]:
    """Every file the backup holds that exists now, config first."""
    files = [cfg.source]
    for value in (cfg.coordinator.ca, cfg.coordinator.envelope_key, cfg.keys.node_key, cfg.keys.envelope_key):
        if value:
            path = cfg.path(value)
            files += [path, path.with_suffix(".pub")]
    ledger = PrivacyLedger.records_path(cfg.ledger_path)
    files += [cfg.ledger_path, *sorted(ledger.glob("*"))] if ledger.is_dir() else [cfg.ledger_path]
    audit = AuditLog(cfg.audit_path)
    files += [audit.path, audit.head_path]
    files += [cfg.state_dir / "runs.json", cfg.state_dir / "connection.json"]
    files += ReleaseStore(cfg.release_dir).files()
    seen: set[Path] = set()
    return [p for p in files if p.is_file() and not (p in seen or seen.add(p))]  # type: ignore[func-returns-value]


def backup(cfg: HospitalConfig, out: Path) -> str:
    """Write the archive (tar.gz, 0600) to ``out``; one line saying what it holds."""
    out = out.expanduser().resolve()
    if out.exists():
        raise ConfigError(f"{out} exists; a backup is never overwritten: choose a new name")
    if not out.parent.is_dir():
        raise ConfigError(f"{out.parent} is not a folder; create it first")
    base = cfg.source.parent
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    manifest: dict[str, object] = {
        "hospital": cfg.name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": str(cfg.source),
        "files": {},
    }
    files: dict[str, str] = {}
    try:
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
            # the rounds write the ledger before the audit trail, never holding both: this order cannot deadlock
            with (
                _holding(ledger_lock(cfg.ledger_path)),
                _holding(audit_lock(cfg.audit_path)),
                locked(cfg.release_dir),  # taken alone by the release gate, never with the others
            ):
                paths = state_files(cfg)
                for path in paths:
                    data = path.read_bytes()
                    name = _arcname(path, base)
                    files[name] = str(path)
                    info = tarfile.TarInfo(name)
                    info.size, info.mode, info.mtime = len(data), path.stat().st_mode & 0o777, int(path.stat().st_mtime)
                    tar.addfile(info, io.BytesIO(data))
                    manifest["files"][name] = {  # type: ignore[index]
                        "from": str(path),
                        "sha256": hashlib.sha256(data).hexdigest(),
                    }
                releases = PrivacyLedger.open(cfg.ledger_path).releases() if cfg.ledger_path.is_file() else 0
                records = len(AuditLog(cfg.audit_path).records()) if cfg.audit_path.is_file() else 0
            manifest["ledger_releases"], manifest["audit_records"] = releases, records
            doc = (json.dumps(manifest, indent=1) + "\n").encode()
            info = tarfile.TarInfo("BACKUP-MANIFEST.json")
            info.size, info.mode, info.mtime = len(doc), 0o600, int(time.time())
            tar.addfile(info, io.BytesIO(doc))
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    outside = sum(1 for name in files if name.startswith("root/"))
    return (
        f"wrote {out} (0600: it holds the private keys): {len(files)} files, privacy ledger with {releases} "
        f"releases, audit trail of {records} records"
        + (f"; {outside} from outside {base} under root/" if outside else "")
        + f"; restore with `tar -xzf {out.name} -C {base}` (README: Backup and restore)"
    )
