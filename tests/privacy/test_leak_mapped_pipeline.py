"""The pipeline's mapped leak scan (``operations.leak_scan_shards`` > 1: the privacy figures, then plan, one scan per
part, merge, as the DAG's tasks run them) gives the privacy report and summary the one-process stage gives, on a
release with a real MRN planted in one row group of the synthetic table; that leak, found by one part, refuses
the release at the gate; the clean release passes it."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from synthfactory import pipeline as p
from synthfactory.release.gate import GateRefused
from synthfactory.spec import load_spec
from tests.conftest import open_gates, write_spec

LEAK_FIELDS = ("leak_clean", "leak_hits")


@pytest.fixture(scope="module")
def run(tmp_path_factory, small_extract):
    base = tmp_path_factory.mktemp("leakmap")
    ctxs = {}
    for shards in (1, 3):  # one spec name and run id: the same staging files, scanned either way
        path = write_spec(base / f"specs{shards}", "leakmap", small_extract, base / "staging",
                          operations__leak_scan_shards=shards, **open_gates())
        ctxs[shards] = p.RunContext(spec=load_spec(path), run_id="r1", version="v20260101T000000Z",
                                    salt=b"k" * 32, signing_key=b"s" * 32)
    ctx = ctxs[1]
    ingested = p.ingest(ctx)
    prepared = p.prepare(ctx, ingested)
    sampled = p.sample(ctx, p.fit(ctx, prepared), prepared)
    q = p.quality(ctx, prepared, sampled)
    # the leaky release: the synthetic table in 4 row groups, a real MRN in a string cell of the third
    ids = pq.read_table(ingested["identifiers_uri"]).to_pylist()
    mrn = next(r["value"] for r in ids if r["kind"] == "identifier" and len(r["value"]) >= 6)
    syn = pq.read_table(sampled["synthetic_uri"])
    col = next(f.name for f in syn.schema if pa.types.is_string(f.type) and f.name != "synthetic_id")
    values = syn.column(col).to_pylist()
    at = len(values) // 2 + 1
    values[at] = f"{values[at]} {mrn}"
    leaky_uri = ctx.uri("synthetic", "leaky.parquet")
    pq.write_table(syn.set_column(syn.schema.get_field_index(col), col, pa.array(values, pa.string())), leaky_uri,
                   row_group_size=-(-len(values) // 4))
    return {"ctx": ctxs, "ingested": ingested, "prepared": prepared, "sampled": sampled, "quality": q,
            "leaky": {**sampled, "synthetic_uri": leaky_uri}}


def _mapped(ctx, run, sampled):
    """The DAG's tasks in turn: privacy_metrics, leak_scan_plan, leak_scan_part (mapped), privacy (merge)."""
    metrics = p.privacy(ctx, run["prepared"], sampled, run["ingested"], run["quality"], scan_leaks=False)
    assert "leak_clean" not in metrics  # nothing says clean before the merge
    units = p.plan_leak_scan(ctx, run["prepared"], sampled, run["ingested"], run["quality"], metrics)
    parts = [p.leak_scan_part(ctx, u) for u in units]
    summary = p.with_leak_scan(ctx, metrics, p.merge_leak_scan(ctx, parts[::-1]))
    assert not ctx.store.exists(p.leak_scan_uri(ctx))  # the plan and matched-hash files are gone
    return units, parts, summary


def test_mapped_scan_equals_the_privacy_stage_scan_and_a_leak_in_one_part_refuses(run):
    one, three = run["ctx"][1], run["ctx"][3]
    leaky = run["leaky"]
    single = p.privacy(one, run["prepared"], leaky, run["ingested"], run["quality"])
    single_scan = one.store.read_json(single["report_uri"])["leak_scan"]
    units, parts, mapped = _mapped(three, run, leaky)
    assert len([u for u in units if u["row_groups"]]) == 3  # the synthetic table cut into ranges
    assert [bool(pt["hit"]) for pt in parts if pt["row_groups"]] == [False, True, False]  # one part found it
    assert three.store.read_json(mapped["report_uri"])["leak_scan"] == single_scan
    assert {k: mapped[k] for k in LEAK_FIELDS} == {k: single[k] for k in LEAK_FIELDS} == \
        {"leak_clean": False, "leak_hits": 1}
    assert single_scan["hits"][0]["kinds"] == ["identifier"]
    with pytest.raises(GateRefused) as err:
        p.gate(three, leaky, run["quality"], mapped, run["ingested"])
    failed = [c["name"] for c in err.value.decision["checks"] if not c["passed"]]
    assert failed == ["leak_scan_clean"]


def test_mapped_scan_of_the_clean_release_passes_the_gate(run):
    one, three = run["ctx"][1], run["ctx"][3]
    sampled = run["sampled"]
    single = p.privacy(one, run["prepared"], sampled, run["ingested"], run["quality"])
    single_scan = one.store.read_json(single["report_uri"])["leak_scan"]
    mapped = p.privacy(three, run["prepared"], sampled, run["ingested"], run["quality"])  # the CLI: parts in turn
    assert three.store.read_json(mapped["report_uri"])["leak_scan"] == single_scan
    assert mapped["leak_clean"] is True and mapped["leak_hits"] == 0
    gated = p.gate(three, sampled, run["quality"], mapped, run["ingested"])
    assert gated["approved"]
