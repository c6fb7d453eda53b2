"""fedtune.data.clinical: the embedded, generated clinical extraction task."""

from __future__ import annotations

import collections
import hashlib
import json
import re
import subprocess
import sys

import pytest

from fedtune.config import DataSettings
from fedtune.config.names import MAX_CLINICAL_HOSPITALS
from fedtune.data import clinical
from fedtune.data.clinical import (
    DX_LABELS,
    HOSPITALS,
    INSTRUCTION,
    MAX_HOSPITALS,
    generate,
    generate_site,
    label_of,
    site_id,
    site_profile,
)
from fedtune.data.records import Example, dataset_hash
from fedtune.errors import ConfigError, DataError
from fedtune.security.keys import check_name

KEYS = ["age", "sex", "bp", "hr", "dx"]
SEX_WORDS = {
    "F": r"\b(woman|female|lady|mrs|ms|she)\b|\d(yo)?F\b",
    "M": r"\b(man|male|gentleman|mr|he)\b|\d(yo)?M\b",
}


@pytest.fixture(scope="module")
def sites() -> dict[str, tuple[list[Example], list[Example]]]:
    return generate(len(HOSPITALS) + 1, n_train=120, n_eval=20, seed=0)


def _note(example: Example) -> str:
    user = example.messages[0][1]
    assert user.startswith(INSTRUCTION + "\n\n")
    return user[len(INSTRUCTION) + 2 :]


def test_names_and_instruction() -> None:
    assert len(HOSPITALS) >= 5 and len(set(HOSPITALS)) == len(HOSPITALS)
    assert all(re.fullmatch(r"[a-z]+(-[a-z]+)+", h) for h in HOSPITALS)
    assert 6 <= len(DX_LABELS) <= 10
    for word in [*KEYS, "JSON", *DX_LABELS]:
        assert word in INSTRUCTION
    assert clinical.site_id(0) == HOSPITALS[0]
    assert clinical.site_id(len(HOSPITALS) + 1) == HOSPITALS[1] + "-2"


def test_generation_is_deterministic_across_processes(sites) -> None:
    assert generate(len(HOSPITALS) + 1, n_train=120, n_eval=20, seed=0) == sites
    assert generate(2, n_train=120, n_eval=20, seed=1) != {k: sites[k] for k in list(sites)[:2]}
    code = (
        "from fedtune.data.clinical import generate; from fedtune.data.records import dataset_hash;"
        "s = generate(6, n_train=120, n_eval=20, seed=0);"
        "print([dataset_hash(t + e) for t, e in s.values()])"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == str([dataset_hash(t + e) for t, e in sites.values()])


# sha256 of the first 200 records' messages of the first three hospitals at seed 0, as
# generated when the README's results were made: a refactoring must not change the data
KNOWN = {
    0: "cc5814f577c159f998e3c35161f636cb6728d481bf0c07602555b13f5cddae26",
    1: "39b285e4335206b9f4b1a20523c971cd10a23beb63c97bfb1402dd464e5c9025",
    2: "1635409d62112be426adb15725d0192d013bf0c54cce517d61a802860baf6623",
}


@pytest.mark.parametrize("site", sorted(KNOWN))
def test_the_published_records_are_generated_unchanged(site: int) -> None:
    records = generate_site(site, 200, seed=0)
    assert hashlib.sha256(json.dumps([e.messages for e in records]).encode()).hexdigest() == KNOWN[site]


def test_sites_are_independent_and_extend() -> None:
    assert (
        generate_site(2, 30, seed=7)
        == generate(4, n_train=20, n_eval=10, seed=7)["riverside-community"][0]
        + generate(4, n_train=20, n_eval=10, seed=7)["riverside-community"][1]
    )
    assert generate_site(2, 10, seed=7) == generate_site(2, 30, seed=7)[:10]
    assert generate_site(0, 0, seed=0) == []


def test_targets_are_exact_json_consistent_with_the_note(sites) -> None:
    combined = {site_id(i): (generate_site(i, 12, seed=1), []) for i in range(40, MAX_HOSPITALS, 9)}
    for site, (train, held) in {**sites, **combined}.items():
        for ex in train + held:
            assert ex.site == site
            note, target = _note(ex), json.loads(ex.target)
            assert list(target) == KEYS
            assert ex.target == json.dumps(target, separators=(", ", ": "))
            assert isinstance(target["age"], int) and 18 <= target["age"] <= 100
            assert isinstance(target["hr"], int) and target["sex"] in ("F", "M")
            assert target["dx"] in DX_LABELS and label_of(ex) == target["dx"]
            systolic, diastolic = (int(v) for v in target["bp"].split("/"))
            assert systolic > diastolic
            for value in (target["age"], target["hr"], systolic, diastolic):
                assert re.search(rf"(?<![\d.]){value}(?!\.?\d)", note), (value, note)
            assert re.search(rf"(?<!\d){systolic}(/| over ){diastolic}(?!\d)", note), note
            assert 40 <= len(note) <= 260
            said = {sex for sex, pattern in SEX_WORDS.items() if re.search(pattern, note, re.I)}
            assert said == {target["sex"]}, note


def test_no_duplicate_notes(sites) -> None:
    for train, held in sites.values():
        train_notes = {_note(e) for e in train}
        assert len(train_notes) == len(train)
        assert not train_notes & {_note(e) for e in held}
        assert len({_note(e) for e in held}) == len(held)


def test_hospitals_write_in_different_styles(sites) -> None:
    hallmarks = {
        "st-elsewhere": r"-year-old| years old",
        "northgate-general": r"^\d+(yo)?[FM][ ,]",
        "riverside-community": r"^PATIENT: .* \| VITALS: ",
        "mercy-valley": r"Discharge summary|was discharged",
        "lakeshore-medical": r"^Triage",
    }
    for site, pattern in hallmarks.items():
        for other, (train, _) in sites.items():
            share = sum(bool(re.search(pattern, _note(e))) for e in train) / len(train)
            assert share == (1.0 if other.startswith(site) else 0.0), (site, other)
    # the same diagnosis is worded differently from site to site
    words = {s: {_note(e).rsplit(":", 1)[-1] for e in t if label_of(e) == "pneumonia"} for s, (t, _) in sites.items()}
    assert not words["st-elsewhere"] & words["northgate-general"]
    assert not words["northgate-general"] & words["riverside-community"]


def test_label_mix_differs_between_hospitals(sites) -> None:
    mixes = {s: collections.Counter(label_of(e) for e in t) for s, (t, _) in sites.items()}
    tops = [m.most_common(1)[0][0] for s, m in mixes.items() if s in HOSPITALS]
    assert len(set(tops)) >= 4
    assert mixes["st-elsewhere"] != mixes["st-elsewhere-2"]
    cardiology = mixes["riverside-community"]
    assert cardiology["heart failure"] + cardiology["atrial fibrillation"] > 0.5 * sum(cardiology.values())


def test_errors() -> None:
    with pytest.raises(ConfigError, match=r"`data.hospitals` must be in 1\.\.1000 .*, got 0$"):
        generate(0, n_train=1, n_eval=1, seed=0)
    with pytest.raises(ConfigError, match=r"`data.hospitals` must be in 1\.\.1000 .*, got 1001$"):
        generate(MAX_HOSPITALS + 1, n_train=1, n_eval=1, seed=0)
    with pytest.raises(ConfigError, match=r"`data.train_per_hospital` and `data.eval_per_hospital`"):
        generate(1, n_train=1, n_eval=0, seed=0)
    with pytest.raises(ConfigError, match=r"`site_index` must be in 0\.\.999"):
        generate_site(-1, 3, seed=0)
    with pytest.raises(ConfigError, match=r"`site_index` must be in 0\.\.999"):
        clinical.site_id(MAX_HOSPITALS)
    with pytest.raises(DataError, match=r"site h: target is not clinical JSON with a `dx` field"):
        label_of(Example.from_instruction("q", "", "not json", site="h"))


# Each note template style's hallmark (the first 40 sites are also checked by name above).
TEMPLATE_HALLMARKS = (
    r"-year-old| years old",
    r"^\d+(yo)?[FM][ ,]",
    r"^PATIENT: .* \| VITALS: ",
    r"Discharge summary|was discharged",
    r"^Triage",
)


def test_the_first_forty_hospitals_are_unchanged() -> None:
    """Existing results stay reproducible: the sites that existed before combined profiles
    generate the very same records (hash from the code that made the published results, b69c83d)."""
    sites = generate(40, n_train=8, n_eval=2, seed=0)
    assert list(sites)[-1] == "lakeshore-medical-8" and list(sites)[5] == "st-elsewhere-2"
    digest = hashlib.sha256("".join(k + dataset_hash(t + e) for k, (t, e) in sites.items()).encode()).hexdigest()
    assert digest == "9831e08d00da802f91f57ab858c9b82204dce7ff406369f29121a28620dbce42"


def test_every_hospital_up_to_the_maximum_has_its_own_profile_and_name() -> None:
    assert MAX_HOSPITALS == MAX_CLINICAL_HOSPITALS == 1000
    profiles = [site_profile(i) for i in range(MAX_HOSPITALS)]
    names = [site_id(i) for i in range(MAX_HOSPITALS)]
    assert len(set(profiles)) == len(set(names)) == MAX_HOSPITALS
    # no two hospitals share the diagnosis mix and the words it is written in
    assert len({(p.templates, p.vocabulary, p.weights) for p in profiles}) == MAX_HOSPITALS
    for i, (name, p) in enumerate(zip(names, profiles, strict=True)):
        check_name(name)  # usable as a party's key name
        assert name.startswith(HOSPITALS[p.templates] + ("-" if i >= len(HOSPITALS) else ""))
    combined = profiles[40:]
    assert sum(p.templates != p.vocabulary for p in combined) > len(combined) // 2
    assert site_id(40) == f"{HOSPITALS[profiles[40].templates]}-41"


def test_combined_hospitals_write_their_templates_with_their_vocabulary() -> None:
    """Measured on the generated notes: a combined site's notes all match its template style's
    hallmark and no other, and every diagnosis is worded in its vocabulary style's words."""
    for i in range(40, 70):
        p = site_profile(i)
        records = generate_site(i, 40, seed=3)
        assert {e.site for e in records} == {site_id(i)}
        for e in records:
            note = _note(e)
            matched = [k for k, pattern in enumerate(TEMPLATE_HALLMARKS) if re.search(pattern, note)]
            assert matched == [p.templates], (i, note)
            label = DX_LABELS.index(label_of(e))
            assert any(word in note for word in clinical._DX_WORDS[p.vocabulary][label].split("|")), (i, note)
    # and their record sets differ from each other and from the first forty
    notes = {i: frozenset(_note(e) for e in generate_site(i, 20, seed=0)) for i in range(0, 200, 7)}
    assert len(set(notes.values())) == len(notes)


def test_config_accepts_up_to_the_maximum_with_one_line_above() -> None:
    assert DataSettings(hospitals=MAX_HOSPITALS).hospitals == MAX_HOSPITALS
    with pytest.raises(ConfigError, match=r"^`data.hospitals` must be at most 1000 with the embedded clinical task"):
        DataSettings(hospitals=MAX_HOSPITALS + 1)
    assert DataSettings(source="files", files=("a.jsonl",), hospitals=2000, partition="iid").hospitals == 2000
    big = generate(64, n_train=4, n_eval=1, seed=0)
    assert len(big) == 64 and all(len(t) == 4 and len(e) == 1 for t, e in big.values())
