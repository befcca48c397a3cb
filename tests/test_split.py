"""The split tuneforge carves keeps near-duplicate families whole, stays stratified and is repeatable."""
import random
from collections import Counter

import pandas as pd
import pytest

from tuneforge.config import AuditConfig, DataConfig
from tuneforge.tasks.classification.spec import ClassificationTaskConfig
from tuneforge.data.audit import audit
from tuneforge.tasks.classification.data import prepare_data

VOCAB = [f"w{i}" for i in range(5000)]


def _planted(tmp_path, n_single=600, n_families=60, seed=0):
    """Singletons plus families of 2-12 near-copies (one template, a different last word each: Jaccard ~0.9),
    labels 'spam' (30%) and 'ham'; every family shares one label, as templated spam campaigns do."""
    rng = random.Random(seed)
    rows, family_of = [], {}
    for _ in range(n_single):
        rows.append({"text": " ".join(rng.sample(VOCAB, 20)), "label": "spam" if rng.random() < 0.3 else "ham"})
    for f in range(n_families):
        template, label = rng.sample(VOCAB, 20), "spam" if rng.random() < 0.3 else "ham"
        for last in rng.sample(VOCAB, rng.randint(2, 12)):
            family_of[len(rows)] = f
            rows.append({"text": " ".join(template + [last]), "label": label})
    order = list(range(len(rows)))
    rng.shuffle(order)  # families scattered through the file, as in real data
    rows = [rows[i] for i in order]
    family_of = {new: family_of[old] for new, old in enumerate(order) if old in family_of}
    path = tmp_path / "planted.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path, rows, family_of


def _split_of_rows(data) -> dict[int, str]:
    return {row: name for name, ex in data.splits.items() for row in ex.rows}


def _prepare(path, seed=42, leakage="drop", **data):
    return prepare_data(DataConfig(path=str(path), seed=seed, dedupe="exact", **data), ClassificationTaskConfig(),
                        leakage=leakage)


def test_no_family_straddles_two_splits_and_labels_stay_stratified(tmp_path):
    path, rows, family_of = _planted(tmp_path)
    data = _prepare(path)
    where = _split_of_rows(data)
    families: dict[int, set] = {}
    for row, fam in family_of.items():
        families.setdefault(fam, set()).add(where[row])
    assert all(len(splits) == 1 for splits in families.values()), families
    # families did reach the held-out splits (not all parked in train)
    assert {s for splits in families.values() for s in splits} == {"train", "val", "test"}

    overall = Counter(r["label"] for r in rows)
    share = overall["spam"] / len(rows)
    for name, ex in data.splits.items():
        got = Counter(ex.labels)["spam"] / len(ex)
        assert abs(got - share) < 0.03, (name, got, share)
    sizes = {name: len(ex) for name, ex in data.splits.items()}
    assert abs(sizes["test"] - 0.1 * len(rows)) <= 12 and abs(sizes["val"] - 0.1 * len(rows)) <= 12  # a family at most

    g = data.report["duplicate_groups"]
    assert g["kept_together"] == len(set(family_of.values()))
    assert g["rows_in_groups"] == len(family_of)
    assert g["largest"] == max(Counter(family_of.values()).values())


def test_same_seed_same_split_other_seed_other_split(tmp_path):
    path, _, _ = _planted(tmp_path)
    a, b, c = _prepare(path), _prepare(path), _prepare(path, seed=7)
    assert _split_of_rows(a) == _split_of_rows(b)
    assert a.report["test_sha256"] == b.report["test_sha256"]
    assert c.report["test_sha256"] != a.report["test_sha256"]


def test_the_audit_finds_no_leakage_in_a_carved_split_but_a_row_level_split_would_leak(tmp_path):
    path, rows, family_of = _planted(tmp_path)
    data = _prepare(path)
    report = audit(data.splits, [], None, 32, AuditConfig(), duplicates_graph=data.duplicates)
    assert report["leakage"]["groups"] == [] and report["leakage"]["severity"] == "info"
    # the families are still reported, as duplicates within a split
    assert report["duplicates"]["rows_affected"] > 0
    # the shared graph gives what the audit finds computing its own
    def pairs(dup):
        return {frozenset(r["row"] for r in g["rows"]) for g in dup["near"] + dup["normalised_exact"]}

    own = audit(data.splits, [], None, 32, AuditConfig())["duplicates"]
    assert pairs(own) == pairs(report["duplicates"]) and own["rows_affected"] == report["duplicates"]["rows_affected"]

    # the same rows split row by row (every row its own group) leak, and the audit blocks
    from tuneforge.data.split import split

    main = data.splits  # rebuild the examples in file order from the three splits
    everything = sorted(((r, t, lab) for _, ex in main.items() for r, t, lab in zip(ex.rows, ex.texts, ex.labels)))
    from tuneforge.data.clean import Examples

    ex = Examples([t for _, t, _ in everything], [lab for _, _, lab in everything], [r for r, _, _ in everything], str(path))
    naive = split(ex, 0.1, 0.1, 42)  # no groups: the old row-level split
    leaked = audit(naive, [], None, 32, AuditConfig())["leakage"]
    assert leaked["severity"] == "blocking" and leaked["held_out_rows_leaked"] > 0


def test_a_user_supplied_test_file_that_leaks_is_decontaminated_or_blocks(tmp_path):
    path, rows, family_of = _planted(tmp_path)
    fam_rows = [r for r, f in family_of.items() if f == 0]
    test = [{"text": rows[fam_rows[0]]["text"] + " extra", "label": rows[fam_rows[0]]["label"]}]
    test += [{"text": " ".join(random.Random(500 + i).sample(VOCAB, 20)), "label": "ham"} for i in range(30)]
    test += [{"text": " ".join(random.Random(600 + i).sample(VOCAB, 20)), "label": "spam"} for i in range(30)]
    pd.DataFrame(test).to_csv(tmp_path / "test.csv", index=False)
    # block: the family copies the test row, the audit stops the run
    data = _prepare(path, test_path=str(tmp_path / "test.csv"), leakage="block")
    report = audit(data.splits, [], None, 32, AuditConfig(leakage="block"), duplicates_graph=data.duplicates)
    assert report["leakage"]["severity"] == "blocking"
    leaked_test_rows = {r["row"] for g in report["leakage"]["groups"] for r in g["rows"] if r["split"] == "test"}
    assert leaked_test_rows == {0}
    assert data.report["test_source"] == "file"
    # drop (the default): the family's rows (each a near copy of test row 0) are left out; nothing leaks
    data = _prepare(path, test_path=str(tmp_path / "test.csv"))
    left_out = {r["row"]: r["matches"]["row"] for r in data.report["removed"] if r["reason"] == "held_out_copy"}
    assert left_out == {r: 0 for r in fam_rows}
    report = audit(data.splits, [], None, 32, AuditConfig(), duplicates_graph=data.duplicates)
    assert report["leakage"]["severity"] == "info" and len(data.splits.test) == 61


@pytest.mark.parametrize("multi_label", [False, True])
def test_tiny_data_still_holds_rows_out(tmp_path, multi_label):
    rows = [{"text": f"w{i} w{i + 1} w{i + 2}", "label": ["a", "b"][i % 2]} for i in range(0, 60, 3)]
    pd.DataFrame(rows).to_csv(tmp_path / "t.csv", index=False)
    data = prepare_data(DataConfig(path=str(tmp_path / "t.csv")), ClassificationTaskConfig(multi_label=multi_label))
    assert all(len(ex) > 0 for _, ex in data.splits.items())
    assert sum(len(ex) for _, ex in data.splits.items()) == len(rows)
