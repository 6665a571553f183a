"""Privacy metrics (exact matches, DCR, encoding) and the identifier leak scan."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest

from synthfactory.privacy.leak import Identifier, leak_scan, load_identifiers, tokenize
from synthfactory.privacy.encoding import ONE_HOT_VALUE, encode
from synthfactory.privacy.metrics import dcr, exact_match_rate, privacy_metrics
from synthfactory.privacy.neighbors import nearest_distances

N_ROWS = 1000
GENDERS = ["female", "male", "other"]
RACES = ["white", "black", "asian", "native", "other"]


# ------------------------------------------------------------------------------------------------
# fake modelling table
# ------------------------------------------------------------------------------------------------
def make_table(n: int, seed: int, key_prefix: str = "k") -> pd.DataFrame:
    """A patient-level table with the mixed types the modelling tables have."""
    rng = np.random.default_rng(seed)
    age = rng.integers(18, 91, n).astype("int64")
    gender = rng.choice(np.array(GENDERS + [None], dtype=object), n, p=[0.48, 0.47, 0.02, 0.03])
    race = rng.choice(np.array(RACES + [None], dtype=object), n, p=[0.5, 0.2, 0.1, 0.05, 0.1, 0.05])
    has_i10 = rng.random(n) < (age - 10) / 120
    hba1c = rng.normal(5.8 + 0.6 * has_i10, 0.8, n)
    hba1c[rng.random(n) < 0.3] = np.nan
    ldl = rng.normal(120, 30, n)
    ldl[rng.random(n) < 0.4] = np.nan
    bmi = rng.normal(27, 5, n)  # always present, continuous
    birth = pd.Timestamp("2024-01-01") - pd.to_timedelta(age * 365.25 + rng.integers(0, 365, n), unit="D")
    return pd.DataFrame({
        "patient_key": [f"{key_prefix}{seed}_{i:06d}" for i in range(n)],
        "gender": gender,
        "race": race,
        "age": age,
        "deceased": rng.random(n) < 0.05 + age / 400,
        "n_encounters": rng.poisson(3 + age / 20, n).astype("int64"),
        "has_i10": has_i10,
        "hba1c": hba1c,
        "ldl": ldl,
        "bmi": bmi,
        "birth_date": pd.to_datetime(birth).astype("datetime64[ns]"),
    })


def split(df: pd.DataFrame, holdout_fraction: float, seed: int = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    idx = np.random.default_rng(seed).permutation(len(df))
    n_ho = int(round(len(df) * holdout_fraction))
    return (df.iloc[idx[n_ho:]].reset_index(drop=True), df.iloc[idx[:n_ho]].reset_index(drop=True))


@pytest.fixture(scope="module")
def real() -> pd.DataFrame:
    return make_table(N_ROWS, seed=7)


@pytest.fixture(scope="module")
def halves(real) -> tuple[pd.DataFrame, pd.DataFrame]:
    """train / holdout of equal size (then train_ref is all of train)."""
    return split(real, 0.5)


@pytest.fixture(scope="module")
def cols(real) -> list[str]:
    return [c for c in real.columns if c != "patient_key"]


def copy_synth(train: pd.DataFrame, n: int, seed: int = 3) -> pd.DataFrame:
    """A 'synthesizer' that memorised train: it emits train rows (with fresh keys)."""
    rng = np.random.default_rng(seed)
    out = train.iloc[rng.integers(0, len(train), n)].reset_index(drop=True).copy()
    out["patient_key"] = [f"syn_{i}" for i in range(n)]
    return out


def noisy_copy_synth(train: pd.DataFrame, n: int, seed: int = 4) -> pd.DataFrame:
    out = copy_synth(train, n, seed)
    rng = np.random.default_rng(seed)
    for c in ("hba1c", "ldl", "bmi"):
        out[c] = out[c] + rng.normal(0, 0.01 * train[c].std(), n)  # NaN stays NaN
    return out


# ------------------------------------------------------------------------------------------------
# encode
# ------------------------------------------------------------------------------------------------
def test_encode_mixed_types_shared_space():
    train = pd.DataFrame({
        "num": [0.0, 5.0, 10.0, np.nan],
        "cat": ["a", "b", None, "a"],
        "flag": [True, False, True, True],
        "when": pd.to_datetime(["2020-01-01", "2020-01-11", None, "2020-01-21"]),
        "nint": pd.array([1, 2, None, 3], dtype="Int64"),
    })
    other = pd.DataFrame({
        "num": [20.0, -5.0, 5.0, np.nan],               # out of range -> clipped
        "cat": ["zzz", "b", None, None],                # unseen -> all zero; None seen in train
        "flag": [False, None, True, False],             # object bool with a None never seen in train
        "when": pd.to_datetime(["2020-01-06", "2019-01-01", "2021-01-01", None], utc=True),
        "nint": pd.array([2, None, 9, 1], dtype="Int64"),
    })
    cols = ["num", "cat", "flag", "when", "nint"]
    a, b = encode([train, other], cols)
    assert a.dtype == np.float32 and b.dtype == np.float32
    assert a.shape[1] == b.shape[1]
    # num(+ind)=2, cat a/b/missing=3, flag True/False=2, when(+ind)=2, nint(+ind)=2
    assert a.shape == (4, 11)
    assert np.isfinite(a).all() and np.isfinite(b).all()
    assert a.min() >= 0 and a.max() <= 1 and b.min() >= 0 and b.max() <= 1
    # numerics scaled by train min/max and clipped; NaN -> 0 plus indicator
    np.testing.assert_allclose(a[:, 0], [0, 0.5, 1, 0])
    np.testing.assert_allclose(a[:, 1], [0, 0, 0, 1])
    np.testing.assert_allclose(b[:, 0], [1, 0, 0.5, 0])
    np.testing.assert_allclose(b[:, 1], [0, 0, 0, 1])
    # categorical: 'a' most frequent first; unseen -> all-zero, None -> its own column
    cat_a, cat_b = a[:, 2:5], b[:, 2:5]
    assert (cat_a > 0).sum(axis=1).tolist() == [1, 1, 1, 1]
    assert cat_b[0].sum() == 0  # unseen 'zzz'
    np.testing.assert_array_equal(cat_b[2], cat_a[2])  # None == None
    np.testing.assert_array_equal(cat_b[1], cat_a[1])  # 'b' == 'b'
    assert set(np.unique(cat_a)) == {0.0, np.float32(ONE_HOT_VALUE)}
    # bool one-hot; an unseen None -> all zero
    assert (a[:, 5:7] > 0).sum(axis=1).tolist() == [1, 1, 1, 1]
    assert b[1, 5:7].sum() == 0
    # datetimes as days, scaled by train range (20 days); tz-aware handled as UTC; NaT -> indicator
    np.testing.assert_allclose(a[:, 7], [0, 0.5, 0, 1])
    np.testing.assert_allclose(a[:, 8], [0, 0, 1, 0])
    np.testing.assert_allclose(b[:, 7], [0.25, 0, 1, 0], atol=1e-6)
    np.testing.assert_allclose(b[:, 8], [0, 0, 0, 1])
    # nullable Int64 with <NA>
    np.testing.assert_allclose(a[:, 9], [0, 0.5, 0, 1])
    np.testing.assert_allclose(a[:, 10], [0, 0, 1, 0])
    np.testing.assert_allclose(b[:, 9], [0.5, 0, 1, 0])


def test_encode_indicator_only_when_missing_and_constant_column():
    t = pd.DataFrame({"x": [1.0, 2.0], "c": [3, 3]})
    s = pd.DataFrame({"x": [1.5, 9.0], "c": [3, 4]})
    a, b = encode([t, s], ["x", "c"])
    assert a.shape == (2, 2)  # no NaN anywhere -> no indicator columns
    np.testing.assert_allclose(b[:, 1], [0, 0])  # constant train column -> 0


def test_nearest_distances_exact_against_brute_force():
    rng = np.random.default_rng(0)
    q = rng.random((300, 7)).astype(np.float32)
    r = rng.random((500, 7)).astype(np.float32)
    r[:10] = q[:10]  # exact duplicates -> distance exactly 0
    d, idx = nearest_distances(q, r, chunk=64)  # several query and reference blocks
    full = np.sqrt(((q[:, None, :].astype(np.float64) - r[None, :, :]) ** 2).sum(-1))
    np.testing.assert_allclose(d, full.min(axis=1), rtol=1e-5, atol=1e-6)
    assert (d[:10] == 0).all()
    np.testing.assert_allclose(full[np.arange(len(q)), idx], full.min(axis=1), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# exact matches
# ------------------------------------------------------------------------------------------------
def test_exact_match_normalisation():
    real = pd.DataFrame({"a": [1, 2, 3], "b": ["x", None, "z"], "c": [np.nan, 1.5, 2.0]})
    syn = pd.DataFrame({
        "a": [1.0, 2.0, 3.0, 1.0],        # 1 == 1.0
        "b": ["x", np.nan, "Z", "x"],     # None == NaN; case matters
        "c": [np.nan, 1.5, 2.0, 0.0],     # NaN == NaN
    })
    r = exact_match_rate(real, syn, ["a", "b", "c"])
    assert r == {"exact_match_rate": 0.5, "exact_matches": 2, "synthetic_rows": 4}


def test_exact_match_datetime_and_bool():
    real = pd.DataFrame({"t": pd.to_datetime(["2020-01-01", None]), "f": [True, None]})
    syn = pd.DataFrame({"t": pd.to_datetime(["2020-01-01", None, "2020-01-02"]), "f": [True, None, True]})
    assert exact_match_rate(real, syn, ["t", "f"])["exact_matches"] == 2


# ------------------------------------------------------------------------------------------------
# DCR: the three synthesizers
# ------------------------------------------------------------------------------------------------
def test_copying_synthesizer_is_caught(halves, cols):
    train, holdout = halves
    syn = copy_synth(train, len(train))
    em = exact_match_rate(pd.concat([train, holdout], ignore_index=True), syn, cols)
    assert em["exact_match_rate"] == 1.0
    r = dcr(train, holdout, syn, cols)
    assert r["dcr_share"] >= 0.95
    assert r["dcr_share_adjusted"] >= 0.95
    assert r["synth_to_train_median"] == 0.0
    assert r["dcr_ratio"] < 0.05
    assert r["synth_to_train_p05"] == 0.0
    assert r["holdout_to_train_median"] > 0
    assert r["dcr_ratio_epsilon"] == 0.0


def test_noisy_copy_synthesizer_is_caught(halves, cols):
    train, holdout = halves
    syn = noisy_copy_synth(train, len(train))
    em = exact_match_rate(pd.concat([train, holdout], ignore_index=True), syn, cols)
    assert em["exact_match_rate"] <= 0.01
    r = dcr(train, holdout, syn, cols)
    assert r["dcr_share"] > 0.6
    assert r["dcr_share_adjusted"] > 0.6
    assert r["dcr_ratio"] < 0.5


def test_independent_synthesizer_passes(halves, cols):
    train, holdout = halves
    syn = make_table(len(train), seed=99)
    em = exact_match_rate(pd.concat([train, holdout], ignore_index=True), syn, cols)
    assert em["exact_match_rate"] <= 0.01
    r = dcr(train, holdout, syn, cols)
    assert abs(r["dcr_share"] - 0.5) <= 0.1
    assert abs(r["dcr_share_adjusted"] - 0.5) <= 0.1
    assert 0.7 < r["dcr_ratio"] < 1.4
    assert r["holdout_to_train_median"] > 0 and r["synth_to_train_median"] > 0


def test_unequal_split_subsamples_train_and_adjusted_share(real, cols):
    """With a 20 % holdout, train_ref is a subsample; a pure copier's rows are mostly outside it, so
    the literal dcr_share is diluted (~0.625) while dcr_share_adjusted still reads ~1.0."""
    train, holdout = split(real, 0.2)
    r = dcr(train, holdout, copy_synth(train, 800), cols, seed=5)
    assert (r["train_rows"], r["holdout_rows"], r["reference_rows"], r["synthetic_rows"]) == (800, 200, 200, 800)
    assert 0.55 < r["dcr_share"] < 0.72
    assert r["dcr_share_adjusted"] >= 0.95
    assert r["train_closer_expected_full"] == pytest.approx(0.8)
    ind = dcr(train, holdout, make_table(800, seed=123), cols, seed=5)
    assert abs(ind["dcr_share"] - 0.5) <= 0.1
    assert abs(ind["dcr_share_adjusted"] - 0.5) <= 0.1
    # seeded: same seed, same answer
    assert dcr(train, holdout, make_table(800, seed=123), cols, seed=5) == ind


def test_dcr_ratio_epsilon_when_holdout_duplicates_train():
    train = pd.DataFrame({"x": [1, 2, 3, 4] * 5, "c": ["a", "b"] * 10})
    holdout = train.iloc[:10].reset_index(drop=True)
    r = dcr(train, holdout, train.iloc[:10], ["x", "c"])
    assert r["holdout_to_train_median"] == 0.0
    assert r["dcr_ratio_epsilon"] > 0
    assert r["dcr_share"] == pytest.approx(0.5)  # all ties, split half/half


def test_privacy_metrics_shape(halves):
    train, holdout = halves
    syn = make_table(300, seed=11)
    syn["only_in_synth"] = 1
    out = privacy_metrics(train, holdout, syn, exclude=("patient_key",), seed=0)
    assert "patient_key" not in out["columns"] and "only_in_synth" not in out["columns"]
    assert out["columns"][0] == "gender"
    assert out["exact_match"]["synthetic_rows"] == 300
    d = out["dcr"]
    for k in ("dcr_share", "synth_to_train_median", "holdout_to_train_median", "dcr_ratio",
              "synth_to_train_p05", "holdout_to_train_p05"):
        assert isinstance(d[k], float)
    json.dumps(out)  # plain JSON types only


def test_empty_inputs_are_rejected(halves, cols):
    train, holdout = halves
    with pytest.raises(ValueError):
        dcr(train, holdout.iloc[:0], train, cols)
    with pytest.raises(ValueError):
        privacy_metrics(train, holdout, holdout[["patient_key"]], exclude=("patient_key",))


# ------------------------------------------------------------------------------------------------
# leak scan
# ------------------------------------------------------------------------------------------------
UUID = "3f2b8c1e-9a4d-4e7b-b1c2-0d9e8f7a6b5c"
HMAC = "9f86d081884c7d659a2feaa0c55ad015"
NAME = "Emet Dummett"
IDENTIFIERS = [
    (UUID, "resource_id"),
    ("MRN-00482913", "mrn"),
    (NAME, "name"),
    ("Dummett", "family"),
    ("123 Main St", "address"),
    ("555-867-5309", "phone"),
    (HMAC, "hmac_key"),
    ("Li", "family"),   # shorter than min_len: matched as a whole token
    ("Ann", "given"),   # shorter than min_len: matched as a whole token
]


@pytest.fixture()
def store():
    from synthfactory.storage import Store  # storage needs pyarrow

    return Store()


@pytest.fixture()
def idents(tmp_path, store) -> list[str]:
    import pyarrow as pa

    uri = str(tmp_path / "phi" / "identifiers.parquet")
    store.write_table(uri, pa.table({"value": [v for v, _ in IDENTIFIERS], "kind": [k for _, k in IDENTIFIERS]}))
    return load_identifiers(uri, store)


def _clean_outputs(out_dir, store) -> list[str]:
    """Outputs that look like a release: synthetic parquet, JSON report, CSV, HTML."""
    syn = make_table(200, seed=5, key_prefix="syn")
    syn["note"] = ["patient seen; follow-up in clinic"] * 200
    store.write_df(str(out_dir / "patients.parquet"), syn)
    store.write_json(str(out_dir / "report.json"),
                     {"summary": "Synthetic cohort of 200 patients", "rows": 200, "ids": ["syn5_000001"]})
    syn.head(50).to_csv(out_dir / "sample.csv", index=False)
    (out_dir / "report.html").write_text("<html><body><p>Report for Emet-style cohort (synthetic)</p></body></html>")
    return store.listdir(str(out_dir))


def _assert_no_values(result, caplog):
    blob = json.dumps(result).lower() + caplog.text.lower()
    for value, _ in IDENTIFIERS:
        if len(value) < 4:  # too short to search a log for
            continue
        assert value.lower() not in blob
        for tok in tokenize(value):
            if len(tok) >= 4 and not tok.isdigit():
                assert tok not in blob


def test_load_identifiers_keeps_kinds(idents):
    assert len(idents) == len(IDENTIFIERS)
    assert all(isinstance(i, str) and isinstance(i, Identifier) for i in idents)
    assert {i.kind for i in idents} >= {"resource_id", "mrn", "name", "hmac_key"}


def test_leak_scan_clean(tmp_path, store, idents, caplog):
    caplog.set_level(logging.INFO)
    files = _clean_outputs(tmp_path / "out", store)
    r = leak_scan(files, idents, store)
    assert r["clean"] is True and r["hits"] == []
    assert r["files_scanned"] == 4
    assert r["identifiers"] == 9 and r["identifiers_skipped"] == 0 and r["complete"] is True
    _assert_no_values(r, caplog)


def test_leak_scan_parquet_with_real_id(tmp_path, store, idents, caplog):
    caplog.set_level(logging.INFO)
    files = _clean_outputs(tmp_path / "out", store)
    bad = make_table(100, seed=6)
    bad["source_ref"] = None
    bad.loc[42, "source_ref"] = f"Patient/{UUID.upper()}"
    bad["source_ref"] = bad["source_ref"].astype("category")  # dictionary-encoded column
    bad_uri = str(tmp_path / "out" / "leaky.parquet")
    store.write_df(bad_uri, bad)
    r = leak_scan(files + [bad_uri], idents, store)
    assert r["clean"] is False
    assert [h["file"] for h in r["hits"]] == [bad_uri]
    assert r["hits"][0]["count"] == 1 and r["hits"][0]["kinds"] == ["resource_id"]
    _assert_no_values(r, caplog)


def test_leak_scan_json_with_name_in_sentence(tmp_path, store, idents, caplog):
    caplog.set_level(logging.INFO)
    files = _clean_outputs(tmp_path / "out", store)
    bad_uri = str(tmp_path / "out" / "quality.json")
    store.write_json(bad_uri, {"notes": ["note: patient EMET   dummett seen at clinic"]})
    r = leak_scan(files + [bad_uri], idents, store)
    assert r["clean"] is False
    hit, = r["hits"]
    assert hit["file"] == bad_uri
    assert hit["kinds"] == ["family", "name"]  # full name and family name both present
    assert hit["count"] == 2
    _assert_no_values(r, caplog)


def test_leak_scan_csv_with_hmac_key_and_phone(tmp_path, store, idents, caplog):
    caplog.set_level(logging.INFO)
    bad = tmp_path / "out" / "export.csv"
    bad.parent.mkdir(parents=True)
    bad.write_text(f"patient_key,age,phone\nkey_{HMAC.upper()},40,(555) 867 5309\nabc,41,5558675309\n")
    r = leak_scan([str(bad)], idents, store, fingerprints=True)
    hit, = r["hits"]
    assert hit["file"] == str(bad)
    assert hit["kinds"] == ["hmac_key", "phone"]
    assert hit["occurrences"] == 3  # the phone written two ways
    assert all(len(f) == 12 for f in hit["fingerprints"])
    _assert_no_values(r, caplog)


def test_leak_scan_short_identifiers_whole_tokens_and_no_partial_words(tmp_path, store):
    f = tmp_path / "notes.txt"
    f.write_text("Ann Li met Annabel. Dummetts are not Dummett-like? MainSt 123 Main Street")
    r = leak_scan([str(f)], ["Annabel Smith", "123 Main St", "Emet Dummett", "Lin", "Anne"], store)
    assert r["identifiers_skipped"] == 0
    assert r["clean"] is True  # "Dummett" alone is not an identifier here; words are whole tokens
    r = leak_scan([str(f)], ["Li", "Ann"], store)  # short ids are searched too, as whole tokens
    assert r["clean"] is False and r["hits"][0]["count"] == 2 and r["identifiers_skipped"] == 0


def test_leak_scan_gzip_and_kind_inference(tmp_path, store):
    import gzip

    f = tmp_path / "events.ndjson.gz"
    f.write_bytes(gzip.compress(json.dumps({"k": HMAC}).encode() + b"\n"))
    r = leak_scan([str(f)], [HMAC, UUID], store)
    assert r["hits"][0]["kinds"] == ["hmac_key"]


def test_leak_scan_parquet_cells_do_not_join(tmp_path, store):
    import pyarrow as pa

    uri = str(tmp_path / "names.parquet")
    store.write_table(uri, pa.table({"given": ["Emet", "Zed"], "family": ["Zed", "Dummett"],
                                     "last": ["x Emet", "Dummett y"]}))
    assert leak_scan([uri], [NAME], store)["clean"] is True
    store.write_table(uri, pa.table({"nested": pa.array([[{"n": "Dr. emet dummett"}]])}))
    assert leak_scan([uri], [NAME], store)["clean"] is False


def test_leak_scan_speed_thousands_of_identifiers(tmp_path, store):
    import time

    rng = np.random.default_rng(0)
    idents = [f"{rng.integers(0, 16**8):08x}-{rng.integers(0, 16**4):04x}-4abc-8def-{rng.integers(0, 16**12):012x}"
              for _ in range(3000)]
    idents += [f"Given{i} Family{i}" for i in range(3000)]
    words = np.array(["patient", "seen", "clinic", "lab", "value", "normal", "follow", "up"])
    text = " ".join(rng.choice(words, 500_000))  # ~3 MB
    f = tmp_path / "big.txt"
    f.write_text(text + " given2999 FAMILY2999")
    t0 = time.perf_counter()
    r = leak_scan([str(f)], idents, store)
    assert time.perf_counter() - t0 < 5
    assert r["hits"][0]["count"] == 1 and r["hits"][0]["kinds"] == ["text"]


def test_leak_scan_family_name_that_is_a_common_category_is_excused(tmp_path, store):
    """clinosim's cohorts have patients whose family name is "White" or "Black": the race column's categories.
    A one-word name shared as a category by >= k real records is not a leak; a rare one, a full name or an id is."""
    import pandas as pd

    from synthfactory.privacy.leak import Identifier, public_vocabulary

    real = pd.DataFrame({"race": ["White"] * 6 + ["Black or African American"] * 5 + ["Zyxwv"] * 2, "age": range(13),
                         "flag": [True, False] * 6 + [True]})
    vocab = public_vocabulary(real, min_count=5)
    assert {("white",), ("black",), ("african",), ("race",), ("true",), ("false",)} <= vocab
    assert ("zyxwv",) not in vocab  # 2 < k records: a rare value could point at someone
    uri = str(tmp_path / "syn.parquet")
    store.write_df(uri, pd.DataFrame({"race": ["White", "Black or African American", "Zyxwv"], "age": [40, 41, 42]}))
    idents = [Identifier("White", "family"), Identifier("Black", "name"), Identifier("Zyxwv", "family"),
              Identifier("Tom White", "name"), Identifier("White", "identifier")]
    r = leak_scan([uri], idents[:3], store, vocabulary=vocab)
    assert r["identifiers_vocabulary"] == 2
    hit, = r["hits"]  # only the rare one
    assert hit["count"] == 1 and hit["kinds"] == ["family"]
    # without the vocabulary (and the common-word list, which has "white" and "black"): both would hit
    assert leak_scan([uri], idents[:2], store, common_words=False)["clean"] is False
    assert leak_scan([uri], idents[:2], store, vocabulary=vocab)["clean"] is True
    # an identifier value (not a name) is never excused, nor is a full name
    assert leak_scan([uri], [idents[4]], store, vocabulary=vocab)["clean"] is False
    store.write_df(uri, pd.DataFrame({"note": ["seen: Tom White"]}))
    assert leak_scan([uri], [idents[3]], store, vocabulary=vocab)["clean"] is False


def test_dcr_query_cap_is_a_stated_subsample_of_exact_distances(cols):
    """``max_query_rows``: at or above the table's rows nothing changes (same figures as uncapped); below, the
    synthetic and holdout queries are a seeded subsample whose nearest rows are still searched in all of train
    and holdout: the report says so, the shares stay within a few standard errors of the whole table's, and a
    copier is still caught."""
    real = make_table(6000, seed=21)
    train, holdout = split(real, 0.2)
    syn = make_table(4800, seed=99)
    full = dcr(train, holdout, syn, cols, seed=5)
    assert full["query_subsampled"] is False and full["query_rows"] == {"synthetic": 4800, "holdout": 1200}
    same = dcr(train, holdout, syn, cols, seed=5, max_query_rows=4800)
    assert {k: v for k, v in same.items()} == full
    capped = dcr(train, holdout, syn, cols, seed=5, max_query_rows=1000)
    assert capped["query_subsampled"] is True
    assert capped["query_rows"] == {"synthetic": 1000, "holdout": 1000}
    assert (capped["synthetic_rows"], capped["train_rows"], capped["holdout_rows"]) == (4800, 4800, 1200)
    for k in ("dcr_share", "dcr_share_adjusted"):
        se = capped[f"{k}_se"]
        assert 0.005 < se < 0.05
        assert abs(capped[k] - full[k]) <= 4 * se, k
    assert capped["dcr_share_se"] > full["dcr_share_se"]
    assert abs(capped["dcr_ratio"] - full["dcr_ratio"]) < 0.15
    assert dcr(train, holdout, syn, cols, seed=5, max_query_rows=1000) == capped  # seeded
    copier = dcr(train, holdout, copy_synth(train, 4800), cols, seed=5, max_query_rows=500)
    assert copier["dcr_share_adjusted"] >= 0.95 and copier["synth_to_train_median"] == 0.0


def test_privacy_metrics_passes_the_query_cap_to_dcr_and_the_sdmetrics_baseline(halves):
    train, holdout = halves
    syn = make_table(400, seed=12)
    out = privacy_metrics(train, holdout, syn, exclude=("patient_key",), seed=0, dcr_max_query_rows=150)
    assert out["dcr"]["query_rows"] == {"synthetic": 150, "holdout": 150}
    b = out["sdmetrics_dcr_baseline_protection"]
    assert (b["synthetic_rows"], b["query_rows"]) == (400, 150) and 0.0 <= b["score"] <= 1.0
    whole = privacy_metrics(train, holdout, syn, exclude=("patient_key",), seed=0)
    assert whole["dcr"]["query_subsampled"] is False
    assert whole["sdmetrics_dcr_baseline_protection"]["query_rows"] == 400
    assert abs(b["score"] - whole["sdmetrics_dcr_baseline_protection"]["score"]) < 0.15
