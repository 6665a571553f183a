"""source.kind: table on real clinical tables (lifelines' datasets: the ACTG 175 AIDS trial, 2,139 patients; a
breast-cancer lymph-node study, 686; a kidney-transplant cohort, 863): reading, column types, logic rules,
CSV = Parquet = SQL, the leak scan of numeric ids, the utility leak flag and the holdout warnings."""

from __future__ import annotations

import os
import sqlite3

import numpy as np
import pandas as pd
import pytest

from synthfactory.spec import SpecError, parse_spec
from synthfactory.storage import Store

lifelines_datasets = pytest.importorskip("lifelines.datasets")
DATA = os.path.dirname(lifelines_datasets.__file__)


def real(name: str) -> pd.DataFrame:
    df = pd.read_csv(os.path.join(DATA, name))
    return df.drop(columns=[c for c in df.columns if c.startswith("Unnamed")])


def spec_for(uri: str, **source) -> object:
    return parse_spec({"name": "flat_t", "source": {"kind": "table", "uri": uri, **source}})


def ingest(spec, uri, tmp_path, sub="ing", salt=b"s" * 32, sql_reader=None):
    from synthfactory.ingest.table import ingest_table
    from synthfactory.keys import Keyer

    store = Store()
    report = ingest_table(spec.source, uri, str(tmp_path / sub), keyer=Keyer(salt), store=store, sql_reader=sql_reader)
    return report, store.read_df(report["tables"]["table"])


def test_minimal_spec_and_defaults():
    spec = parse_spec({"name": "flat_t", "source": {"kind": "table", "uri": "t.csv", "id_column": "pid"}})
    assert spec.release.bucket and spec.synthesizer.kind == "cart" and spec.source.detect_rules
    spec = parse_spec({"name": "flat_t", "source": {"kind": "table", "query": "select 1", "sql_connection_id": "db"}})
    assert spec.source.uri == "sql-connection://db"
    with pytest.raises(SpecError, match="uri: kind table needs uri"):
        parse_spec({"name": "flat_t", "source": {"kind": "table"}})
    with pytest.raises(SpecError, match="only used with kind: table"):
        parse_spec({"name": "flat_t", "source": {"kind": "fhir_ndjson", "uri": "x", "id_column": "pid"}})
    with pytest.raises(SpecError, match="ordinal"):
        parse_spec({"name": "flat_t", "source": {"kind": "table", "uri": "t.csv", "columns": {"x": "continuous"}}})


def test_types_detected_and_overridden(tmp_path):
    df = real("lymph_node.csv")
    path = tmp_path / "ln.csv"
    df.to_csv(path, index=False)
    report, table = ingest(spec_for(str(path), id_column="id", columns={"nodes": "numeric", "size": "exclude"}),
                           str(path), tmp_path)
    t = report["column_types"]
    assert t["id"] == "identifier" and t["diagdateb"] == "date" and t["age"] == "age"
    assert t["grade"] == "ordinal" and t["censdead"] == "boolean" and t["rectime"] == "integer"
    assert t["nodes"] == "numeric" and t["size"] == "exclude"          # overrides win
    assert "id" not in table and "size" not in table and table["patient_key"].is_unique
    assert str(table["deathdate"].dtype) == "datetime64[ns]"
    # dates are day-first here ("17-08-1984"), every one parsed
    assert table["diagdateb"].notna().all() and table["diagdateb"].iloc[0] == pd.Timestamp("1984-08-17")
    # the ids go to the leak scan, as table ids
    ids = pd.read_parquet(report["identifiers_uri"])
    assert len(ids) == len(df) and set(ids["kind"]) == {"table_id"}


def test_csv_parquet_and_sql_give_the_same_table(tmp_path):
    df = real("ACTG175.csv")
    csv, pq, db = tmp_path / "a.csv", tmp_path / "a.parquet", tmp_path / "a.db"
    df.to_csv(csv, index=False)
    df.to_parquet(pq, index=False)
    with sqlite3.connect(db) as conn:
        df.to_sql("actg", conn, index=False)
    _, from_csv = ingest(spec_for(str(csv), id_column="pidnum"), str(csv), tmp_path, "c")
    _, from_pq = ingest(spec_for(str(pq), id_column="pidnum"), str(pq), tmp_path, "p")
    sql_spec = parse_spec({"name": "flat_t", "source": {"kind": "table", "uri": f"sqlite:///{db}",
                                                         "query": "SELECT * FROM actg", "id_column": "pidnum"}})
    _, from_sql = ingest(sql_spec, f"sqlite:///{db}", tmp_path, "s")
    pd.testing.assert_frame_equal(from_csv, from_pq)
    pd.testing.assert_frame_equal(from_csv, from_sql)
    assert len(from_csv) == 2139 and from_csv["cd496"].isna().sum() == 797   # missing kept missing


def test_sql_through_an_airflow_connection(tmp_path, monkeypatch):
    """The DAG's route: source.sql_connection_id -> a DbApiHook (here the generic one over SQLAlchemy)."""
    from synthfactory.airflow.hooks import SqlTableHook, sql_hook, sql_reader

    df = real("kidney_transplant.csv")
    db = tmp_path / "k.db"
    with sqlite3.connect(db) as conn:
        df.to_sql("kt", conn, index=False)
    monkeypatch.setenv("AIRFLOW_CONN_CLINIC_DB", '{"conn_type": "synthfactory_sql", "extra": {"sqlalchemy_url": '
                                                 f'"sqlite:///{db}"}}}}')
    spec = parse_spec({"name": "flat_t", "source": {"kind": "table", "query": "SELECT * FROM kt",
                                                     "sql_connection_id": "clinic_db"}})
    assert isinstance(sql_hook("clinic_db"), SqlTableHook)
    report, table = ingest(spec, spec.source.uri, tmp_path, sql_reader=sql_reader(spec))
    assert len(table) == len(df) and report["rows"] == {"table": len(df)}
    # no id column: row numbers, leak-scanned as nothing real
    assert set(report["column_types"]) == set(df.columns)


def test_rules_detected_on_real_tables():
    from synthfactory.ingest.table import detect_types
    from synthfactory.synthesize.flat import detect_rules, true_value, violations

    df = real("ACTG175.csv").drop(columns=["pidnum"])
    types = detect_types(df, None, {})
    truth = {c: true_value(df[c]) for c, t in types.items() if t == "boolean"}
    rules = {r.describe() for r in detect_rules(df, types, truth)}
    assert "cd496 set only when r is one of [1]" in rules            # CD4 at week 96 only where measured
    assert "treat set only when arms is one of [1, 2, 3]" in rules   # arm 0 is zidovudine alone
    kt = real("kidney_transplant.csv")
    kt_types = detect_types(kt, None, {})
    kt_truth = {c: true_value(kt[c]) for c, t in kt_types.items() if t == "boolean"}
    kt_rules = detect_rules(kt, kt_types, kt_truth)
    assert {"black_male and white_male never set together",
            "white_male and black_female never set together"} <= {r.describe() for r in kt_rules}
    # the real table keeps every detected rule; a shuffled column breaks them
    assert all(not m.any() for m in violations(kt, kt_rules, kt_types, kt_truth).values())
    shuffled = kt.assign(white_male=np.random.default_rng(0).permutation(kt["white_male"].to_numpy()))
    assert any(m.any() for m in violations(shuffled, kt_rules, kt_types, kt_truth).values())


def test_rule_expectations_check_each_rule():
    from synthfactory.ingest.table import detect_types
    from synthfactory.quality.expectations import run_suite, table_rule_expectations
    from synthfactory.synthesize.flat import prepare_table

    kt = real("kidney_transplant.csv")
    types = detect_types(kt, None, {})
    spec = spec_for("kt.csv", rules=[{"type": "only_when", "column": "death", "other": "time",
                                      "values": None}])
    _, plan = prepare_table(kt.assign(patient_key=[str(i) for i in range(len(kt))]), {"types": types}, spec,
                            "patient_key")
    exps = table_rule_expectations(plan)
    assert len(exps) == len(plan["rules"]) and plan["rules"][0]["source"] == "spec"
    suite = {"name": "rules", "expectations": exps}
    assert run_suite(suite, kt)["success"]
    both = kt.copy()
    both.loc[both.index[:5], ["black_male", "white_male"]] = 1
    failed = run_suite(suite, both)["failed"]
    assert failed and {f["column"] for f in failed} & {"black_male", "white_male"}


def test_spec_rule_broken_by_real_data_is_refused():
    from synthfactory.ingest.table import detect_types
    from synthfactory.synthesize.flat import RuleError, prepare_table

    kt = real("kidney_transplant.csv")
    spec = spec_for("kt.csv", rules=[{"type": "exclusive", "column": "death", "other": "white_male"}])
    with pytest.raises(RuleError, match="broken by"):
        prepare_table(kt.assign(patient_key="k"), {"types": detect_types(kt, None, {})}, spec, "patient_key")


def test_levels_and_dates_through_the_transforms():
    """An ordinal 0/0.5/1 column is sampled as one of its levels, a date comes back a date (EHR-aware
    transforms + cart, the default synthesizer)."""
    from synthfactory.synthesize.cart import CartSynthesizer
    from synthfactory.synthesize.transforms import EhrTransformer

    ln = real("lymph_node.csv").drop(columns=["id"])
    ln["deathdate"] = pd.to_datetime(ln["deathdate"], dayfirst=True)
    ln["grade_half"] = (ln["grade"] - 1) / 2.0          # 0, 0.5, 1
    ln = ln.drop(columns=["diagdateb", "recdate"])
    types = {"grade_half": "ordinal", "grade": "ordinal", "deathdate": "date"}
    tr = EhrTransformer(seed=1, types=types).fit(ln)
    model = CartSynthesizer(seed=1).fit(tr.transform(ln))
    out = tr.inverse_transform(model.sample(400))
    assert set(out["grade_half"].unique()) <= {0.0, 0.5, 1.0}
    assert str(out["deathdate"].dtype) == "datetime64[ns]"
    assert out["deathdate"].min() >= ln["deathdate"].min() and out["deathdate"].max() <= ln["deathdate"].max()


def test_numeric_ids_not_matched_inside_decimals(tmp_path):
    from synthfactory.privacy.leak import Identifier, leak_scan

    f = tmp_path / "card.html"
    f.write_text('<path d="M 105.140769 L 216.630031"/> <td>630031</td>')
    ids = [Identifier("140769", "table_id"), Identifier("630031", "table_id")]
    scan = leak_scan([str(f)], ids, Store())
    assert scan["clean"] is False and scan["hits"][0]["count"] == 1    # the standalone one only
    f.write_text('<path d="M 105.140769 L 216.630031"/>')
    assert leak_scan([str(f)], ids, Store())["clean"] is True
    # another kind of identifier is matched inside a decimal as before
    assert leak_scan([str(f)], [Identifier("140769", "mrn")], Store())["clean"] is False
    # short numeric ids cannot be told from figures: the scan says so (clean None: the gate refuses)
    assert leak_scan([str(f)], [Identifier("42", "table_id")], Store())["clean"] is None


def test_utility_flags_and_leaves_out_single_feature_predictors():
    from synthfactory.quality.utility import ml_utility

    df = real("ACTG175.csv").drop(columns=["pidnum"])
    train, hold = df.iloc[:1500], df.iloc[1500:]
    out = ml_utility(train, hold, train.sample(frac=1.0, random_state=0), target="treat", seed=0,
                     keep_leaking_features=False)
    assert [d["feature"] for d in out["leaking_features"]] == ["arms"] and out["leaking_features"][0]["auc"] == 1.0
    assert out["leaking_features_dropped"] and "arms" not in out["features"] and "arms" in out["note"]
    kept = ml_utility(train, hold, train, target="treat", seed=0)             # flagged, kept (the default)
    assert "arms" in kept["features"] and kept["trtr"] > out["trtr"] and kept["leaking_features"]
    # the spec's default (null): left out for a flat table, kept for the FHIR modelling table
    from synthfactory.spec import UtilitySpec

    assert UtilitySpec(target="treat").keep_leaking_features is None


def test_validate_warns_on_a_small_holdout(tmp_path, capsys):
    from synthfactory.cli import holdout_warnings, main

    spec = spec_for("x.csv")
    assert any("anonymeter" in w for w in holdout_warnings(spec, 686))
    assert any("DCR share cannot be resolved" in w for w in holdout_warnings(spec, 150))
    assert holdout_warnings(spec, 5000) == []
    ln = tmp_path / "ln.csv"
    real("lymph_node.csv").to_csv(ln, index=False)
    path = tmp_path / "flat_t.yaml"
    path.write_text(f"name: flat_t\nsource: {{kind: table, uri: {ln}, id_column: id}}\n")
    assert main(["validate", str(path)]) == 0
    cap = capsys.readouterr()
    assert "too small to certify anonymeter" in cap.err and "grade: ordinal" in cap.out
