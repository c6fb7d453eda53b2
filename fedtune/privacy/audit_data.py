"""A simulated hospital's audit material in the run folder, made when the run's data is
prepared (``[privacy_audit]``), read by that hospital only:

```
<run>/data/<site>/canaries.json            the canaries inserted in its train.jsonl, and the fresh ones
<run>/data/<site>/audit-nonmembers.jsonl   extra held-out records for the membership audit (clinical data)
<run>/privacy-audit/<site>.jsonl           its audit of each round's global adapter (written by the hospital)
```

Inserted canaries are appended to the hospital's training records, each ``canary_repeats``
times, so every process that reads the site's training data (the federation, the baselines)
trains on them. Extra nonmembers are generated for the embedded clinical task with the
natural partition (the continuation of the hospital's own generator: never one of its
training or held-out records); otherwise the hospital's held-out split serves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from fedtune.atomic import atomic_write_json
from fedtune.config import ExperimentConfig
from fedtune.data import clinical
from fedtune.data.records import Example, load_records, write_records
from fedtune.errors import CheckpointError
from fedtune.privacy.canaries import Canary, inserted_records, make_canaries

AUDIT_DIR = "privacy-audit"
CANARIES_FILE = "canaries.json"
NONMEMBERS_FILE = "audit-nonmembers.jsonl"

Splits = dict[str, tuple[list[Example], list[Example]]]


@dataclass(frozen=True)
class SiteAudit:
    """One hospital's canaries (inserted in its training records, and fresh) and extra nonmembers."""

    inserted: list[Canary] = field(default_factory=list)
    fresh: list[Canary] = field(default_factory=list)
    nonmembers: list[Example] = field(default_factory=list)

    def is_canary(self, example: Example) -> bool:
        """Whether ``example`` is one of the inserted canaries (by its prompt)."""
        prompts = {c.prompt for c in self.inserted}
        return len(example.messages) >= 2 and example.messages[-2][1] in prompts


def results_path(run_dir: Path, site: str) -> Path:
    """Where simulated hospital ``site`` writes its audit of each round."""
    return run_dir / AUDIT_DIR / f"{site}.jsonl"


def with_audit_data(cfg: ExperimentConfig, splits: Splits) -> tuple[Splits, dict[str, SiteAudit]]:
    """The sites' records with their canaries inserted, and each site's audit material."""
    settings = cfg.privacy_audit
    out: Splits = {}
    audits: dict[str, SiteAudit] = {}
    for index, (site, (train, held)) in enumerate(splits.items()):
        canaries = make_canaries(2 * settings.canaries, tag=site, seed=cfg.run.seed)
        inserted, fresh = canaries[: settings.canaries], canaries[settings.canaries :]
        out[site] = (train + inserted_records(inserted, settings.canary_repeats, site=site), held)
        nonmembers = extra_nonmembers(cfg, index) if settings.membership else []
        audits[site] = SiteAudit(inserted, fresh, [Example(e.messages, site=site) for e in nonmembers])
    return out, audits


def extra_nonmembers(cfg: ExperimentConfig, index: int) -> list[Example]:
    """``privacy_audit.nonmembers`` new records of clinical hospital ``index`` (none for other data)."""
    data = cfg.data
    if data.source != "clinical" or data.partition != "natural":
        return []
    used = data.train_per_hospital + data.eval_per_hospital
    return clinical.generate_site(index, used + cfg.privacy_audit.nonmembers, seed=cfg.run.seed)[used:]


def write_audit_data(run_dir: Path, audits: dict[str, SiteAudit]) -> None:
    for site, audit in audits.items():
        folder = run_dir / "data" / site
        canaries = {
            "inserted": [{"prompt": c.prompt, "secret": c.secret} for c in audit.inserted],
            "fresh": [{"prompt": c.prompt, "secret": c.secret} for c in audit.fresh],
        }
        atomic_write_json(folder / CANARIES_FILE, canaries)
        if audit.nonmembers:
            write_records(folder / NONMEMBERS_FILE, audit.nonmembers)


def read_audit_data(run_dir: Path, site: str) -> SiteAudit:
    """Hospital ``site``'s audit material (empty where the run made none)."""
    folder = run_dir / "data" / site
    path = folder / CANARIES_FILE
    try:
        canaries = json.loads(path.read_text()) if path.is_file() else {}
        inserted = [Canary(c["prompt"], c["secret"]) for c in canaries.get("inserted", [])]
        fresh = [Canary(c["prompt"], c["secret"]) for c in canaries.get("fresh", [])]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: unreadable canaries ({err}); the run folder is damaged") from err
    nonmembers_file = folder / NONMEMBERS_FILE
    nonmembers = load_records(nonmembers_file, site=site) if nonmembers_file.is_file() else []
    return SiteAudit(inserted, fresh, nonmembers)
