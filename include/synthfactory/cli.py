"""The synthfactory command: run the factory for a spec without Airflow, or validate a spec.

synthfactory audit vets a synthetic table made elsewhere: 0 approved · 4 refused · 2 bad input.

Exit codes: 0 released (or spec valid) · 2 invalid spec or usage · 3 bad input (extract missing,
empty, too few patients) · 4 a gate refused (dataset quarantined, nothing released) · 5 the publisher
refused · 1 anything else (a lost connection during the publish says "re-run to resume").
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from synthfactory.errors import (EXIT_ERROR, EXIT_INPUT, EXIT_OK, EXIT_SPEC, SynthFactoryError, TransientError,
                                 describe, exit_code_for)

SPEC_HELP = "the dataset spec, a YAML file (e.g. include/datasets/cohort_demo.yaml)"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("synthfactory")
    except PackageNotFoundError:  # run from a source tree (PYTHONPATH=include)
        from synthfactory import __version__

        return __version__


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="synthfactory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("validate", help="validate a dataset spec (and, with --extract, its features on an extract)")
    v.add_argument("spec", help=SPEC_HELP)
    v.add_argument("--extract", help="also ingest this extract (local folder) into a temporary folder, build the "
                                     "modelling table and refuse (exit 3) labs, conditions and columns (quasi-"
                                     "identifiers, sensitive attributes, relationships, utility) it cannot produce")
    r = sub.add_parser("run", help="run the whole pipeline for a spec, in-process")
    r.add_argument("spec", help=SPEC_HELP)
    r.add_argument("--extract", help="extract URI (local folder or s3://); overrides the spec's source.uri")
    r.add_argument("--out", help="local folder for staging and the release, instead of the spec's targets")
    r.add_argument("--rows", type=int, help="synthetic rows to sample")
    r.add_argument("--profile", default="default", metavar="PROFILE",
                   help="gate threshold profile: a profile named in the spec's profiles, or default (the "
                        "spec's own thresholds; used when omitted)")
    r.add_argument("--synthesizer", help="synthesizer kind, overriding the spec")
    r.add_argument("--epochs", type=int, help="training epochs of a neural synthesizer (ctgan, tvae, copulagan)")
    r.add_argument("--force-ingest", action="store_true",
                   help="ingest again even when a previous run ingested the same extract (operations.reuse_ingest)")
    r.add_argument("--run-id", help="run id (default: a UTC timestamp)")
    r.add_argument("--json", action="store_true", help="print the run summary as JSON on stdout")
    r.add_argument("-q", "--quiet", action="store_true", help="only warnings and the result line")
    ls = sub.add_parser("releases", help="list a dataset's releases: version, rows, gate figures, data card")
    ls.add_argument("spec", help=SPEC_HELP)
    ls.add_argument("--out", help="the local folder a 'run --out' released into, instead of the spec's bucket "
                                  "(boto3's default credential chain; AWS_ENDPOINT_URL is honoured)")
    ls.add_argument("--limit", type=int, default=20, help="newest N versions (default 20; 0 = all)")
    ls.add_argument("--json", action="store_true", help="print the releases as JSON")
    pl = sub.add_parser("pull", help="download a release and verify every file against its manifest's sha256")
    pl.add_argument("spec", help=SPEC_HELP)
    pl.add_argument("--version", dest="release_version", default="latest", metavar="VERSION",
                    help="the release version (v<YYYYMMDD>T<HHMMSS>Z), or latest (default)")
    pl.add_argument("--to", required=True, metavar="DIR",
                    help="a new (or empty) folder for the release's files and its manifest.json")
    pl.add_argument("--out", help="the local folder a 'run --out' released into, instead of the spec's bucket "
                                  "(boto3's default credential chain; AWS_ENDPOINT_URL is honoured)")
    f = sub.add_parser("freeze-suite", help="freeze a run's derived GX expectation suite into "
                                            "include/expectations/<dataset>.json (a frozen suite wins)")
    f.add_argument("spec", help=SPEC_HELP)
    f.add_argument("--run-dir", required=True,
                   help="the run's staging folder (<staging>/<dataset>/runs/<run_id>, local or s3://) or a suite .json")
    f.add_argument("--out", help="destination file (default: include/expectations/<dataset>.json in the project)")
    f.add_argument("--force", action="store_true", help="overwrite an existing frozen suite")
    vw = sub.add_parser("view", help="print the rows of a SQL-on-FHIR v2 ViewDefinition over FHIR NDJSON "
                                     "(try a view on a sample before putting it in a spec)")
    vw.add_argument("view", help="the ViewDefinition, a .json or .yaml file")
    vw.add_argument("resources", nargs="+", help="FHIR resources: .ndjson / .jsonl (also .gz) files, one resource "
                                                 "a line, or a .json resource or Bundle")
    vw.add_argument("--format", choices=("ndjson", "csv", "parquet"), default="ndjson",
                    help="output format (default ndjson)")
    vw.add_argument("--out", help="write to this file instead of stdout")
    vw.add_argument("-q", "--quiet", action="store_true", help="no summary on stderr (problems are still listed)")
    a = sub.add_parser("audit", help="run quality, privacy and the gate on a synthetic table made elsewhere, against "
                                     "a run's real train and holdout split (exit 0 approved, 4 refused, 2 bad input)")
    a.add_argument("spec", help=SPEC_HELP)
    a.add_argument("--run-dir", required=True,
                   help="the run whose real split to audit against: <staging>/<dataset>/runs/<run_id> (local or s3://)")
    a.add_argument("--synthetic", required=True, help="the synthetic table, a Parquet file with the real table's "
                                                      "columns (local or s3://)")
    a.add_argument("--profile", default="default", metavar="PROFILE", help="gate threshold profile (as for run)")
    a.add_argument("--audit-id", help="name of the audit folder under <run>/audits/ (default: a UTC timestamp)")
    a.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    a.add_argument("-q", "--quiet", action="store_true", help="only warnings and the result")
    return p


class PublishInterrupted(TransientError):
    """The connection to S3 was lost while publishing: nothing partial is visible, re-running resumes."""

    label = "publish failed"


def _connection_errors() -> tuple[type[BaseException], ...]:
    """botocore's errors for an unreachable or dropped endpoint (no HTTP response: nothing S3 decided)."""
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError

    return BotoConnectionError, HTTPClientError


class _ResumableWriter:
    """The publish writer, with a lost S3 connection raised as :class:`PublishInterrupted` (exit 1, "re-run to
    resume") rather than botocore's traceback. Everything else passes through unchanged."""

    def __init__(self, inner: Any):
        self._inner = inner
        self._errors = _connection_errors()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name.startswith("_") or not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return attr(*args, **kwargs)
            except self._errors as err:
                raise PublishInterrupted(f"{type(err).__name__}: {err} (re-run to resume)") from err

        return call


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "view":
        return _view(args)
    from synthfactory.spec import SpecError, load_spec

    try:
        spec = load_spec(args.spec)
    except SpecError as err:
        print(f"invalid spec: {err}", file=sys.stderr)
        return EXIT_SPEC
    except (OSError, ValueError) as err:  # unreadable file, a directory, bytes that are not text
        print(f"invalid spec: {args.spec}: cannot read it: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_SPEC
    if args.cmd == "validate":
        return _validate(spec, args)
    if args.cmd == "freeze-suite":
        return _freeze_suite(spec, args)
    if args.cmd == "releases":
        return _releases(spec, args)
    if args.cmd == "pull":
        return _pull(spec, args)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.cmd == "audit":
        return _audit(spec, args)
    return _run(spec, args)


def _view(args) -> int:  # noqa: ANN001
    """``synthfactory view``: a ViewDefinition's rows over resource files (raw ids as keys; see
    :mod:`synthfactory.ingest.view_runner`). Exit 2: an invalid view; 3: a resource file that cannot be read."""
    import os

    from synthfactory.ingest.view_runner import load_view, run_view

    try:
        view = load_view(args.view)
    except SynthFactoryError as err:
        print(f"invalid view: {err}", file=sys.stderr)
        return exit_code_for(err)
    if args.format == "parquet" and not args.out and sys.stdout.isatty():
        print("error: --format parquet writes binary: give --out FILE or redirect stdout", file=sys.stderr)
        return EXIT_SPEC
    for path in args.resources:
        if not os.path.isfile(path):
            print(f"bad input: {path}: no such file", file=sys.stderr)
            return EXIT_INPUT
    out = open(args.out, "wb") if args.out else sys.stdout.buffer
    try:
        report = run_view(view, args.resources, out, args.format)
    except SynthFactoryError as err:
        print(describe(err), file=sys.stderr)
        return exit_code_for(err)
    except BrokenPipeError:  # | head
        return EXIT_OK
    finally:
        if args.out:
            out.close()
    for line in report.problems:
        print(f"warning: {line}", file=sys.stderr)
    if report.refused > len(report.problems):
        print(f"warning: ... and {report.refused - len(report.problems)} more", file=sys.stderr)
    if not args.quiet:
        refused = "; ".join(f"{n} x {reason}" for reason, n in sorted(report.reasons.items(), key=lambda x: -x[1]))
        print(f"view {report.view}: {report.rows} row(s) from {report.resources} {report.resource} resource(s)"
              f"{f'; {report.other_types} of other types skipped' if report.other_types else ''}"
              f"{f'; {report.refused} refused ({refused})' if report.refused else ''}"
              f"{f' -> {args.out}' if args.out else ''}", file=sys.stderr)
    return EXIT_OK


def _audit(spec, args) -> int:  # noqa: ANN001
    """Quality, privacy and the gate on ``--synthetic`` against ``--run-dir``'s real split (synthfactory.audit)."""
    from synthfactory.audit import audit
    from synthfactory.context import project_root
    from synthfactory.errors import EXIT_GATE

    def local(path: str) -> str:
        return path if "://" in path else str(Path(path).resolve())

    try:
        result = audit(spec, local(args.run_dir), local(args.synthetic), profile=args.profile,
                       audit_id=args.audit_id, base_dir=str(project_root(args.spec)))
    except SynthFactoryError as err:
        print(describe(err), file=sys.stderr)
        return exit_code_for(err)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    q, p = result["quality"], result["privacy"]
    figures = (f"rows={result['rows']} quality={q.get('quality_score')} min_column={q.get('min_column_score')} "
               f"pair_trends={q.get('column_pair_trends')} exact_match={p.get('exact_match_rate')} "
               f"dcr_share={p.get('dcr_share')} mia_auc={p.get('mia_auc')}")
    out = sys.stderr if args.json else sys.stdout
    if result["approved"]:
        print(f"approved: {spec.name} audit {result['audit_id']} against run {result['run_id']} ({figures}); "
              f"reports in {result['audit_uri']}", file=out)
        return EXIT_OK
    print(f"refused: {spec.name} audit {result['audit_id']} against run {result['run_id']} ({figures}); "
          f"reports in {result['audit_uri']}", file=out)
    for reason in result["failed"]:
        print(f"  - {reason}", file=out)
    return EXIT_GATE


def _validate(spec, args) -> int:  # noqa: ANN001
    """The spec is valid; with ``--extract``, its features resolve on that extract (ingested to a temporary
    folder with a throwaway salt, deleted afterwards)."""
    from synthfactory.features import column_problems

    if spec.source.kind == "table":  # a flat table's columns are its own: checked against the table
        return _validate_table(spec, args)
    problems = column_problems(spec)
    if problems:  # these would fail in prepare, after the ingest: refuse now, naming the field
        print(f"invalid spec: {args.spec}: " + "; ".join(problems), file=sys.stderr)
        return EXIT_SPEC
    if not args.extract:
        print(f"ok: {spec.name} ({args.spec}) spec_sha256={spec.spec_hash()[:12]}")
        return EXIT_OK
    try:
        info = _features_on_extract(spec, args)
    except SynthFactoryError as err:
        print(describe(err), file=sys.stderr)
        return exit_code_for(err)
    labs = ", ".join(f"{n} ({info['lab_patients'][n]})" for n in info["labs"]) or "none"
    conds = ", ".join(f"cond_{n} ({info['concept_patients'][n]})" for n in info["concepts"]) or "none"
    print(f"ok: {spec.name} ({args.spec}) spec_sha256={spec.spec_hash()[:12]}; on {args.extract}: "
          f"{info['patients']} patients, {len(info['columns'])} columns; labs (patients): {labs}; "
          f"condition concepts (patients): {conds}; top condition flags: "
          f"{', '.join(info['condition_flags']) or 'none'}")
    return EXIT_OK


def holdout_warnings(spec, rows: int) -> list[str]:  # noqa: ANN001
    """What a holdout of ``rows`` x holdout_fraction real rows cannot resolve: the anonymeter risks (their 95 %
    interval needs about (1.96 x 0.5 / (max_risk / 2))^2 attacks, capped by the holdout, to certify the
    threshold) and the DCR share (its sampling sd is about 0.5 / sqrt(holdout); ideal 0.5 + noise_z sd must stay
    under the cap max_dcr_share for a copy to be told from a fresh sample)."""
    import math

    pt = spec.privacy
    holdout = max(1, int(round(rows * spec.synthesizer.holdout_fraction)))
    out = []
    need = math.ceil((1.96 * 0.5 / (pt.max_anonymeter_risk / 2)) ** 2)
    if pt.anonymeter_attacks and holdout < max(need, pt.anonymeter_min_attacks):
        out.append(f"holdout of {holdout} rows ({rows} x {spec.synthesizer.holdout_fraction}): too small to certify "
                   f"anonymeter risks at {pt.max_anonymeter_risk} (about {need} attacks needed, capped by the "
                   f"holdout); the gate will only refuse significant evidence of risk"
                   + ("; require_anonymeter_certification will refuse every run" if
                      pt.require_anonymeter_certification else ""))
    band = pt.noise_z * 0.5 / math.sqrt(holdout)
    if 0.5 + band > pt.max_dcr_share:
        out.append(f"holdout of {holdout} rows: the DCR share cannot be resolved (sampling sd about "
                   f"{0.5 / math.sqrt(holdout):.3f}; 0.5 + {pt.noise_z} sd = {0.5 + band:.3f} exceeds "
                   f"max_dcr_share {pt.max_dcr_share}): a copy of the table may not be told from fresh rows")
    return out


def _validate_table(spec, args) -> int:  # noqa: ANN001
    """A flat table: read it (--extract, else source.uri when it is a local file or a SQLAlchemy URL), show the
    column types and logic rules found, and warn where the holdout is too small for the privacy figures."""
    import secrets
    import tempfile

    from synthfactory.context import project_root, resolve
    from synthfactory.ingest.table import is_sql_url
    from synthfactory.storage import Store, is_s3

    uri = args.extract or spec.source.uri
    base = project_root(args.spec)
    uri = resolve(uri, base) if uri else uri
    readable = uri and ((not is_s3(uri) and "://" not in uri and Path(uri).exists()) or
                        (spec.source.query and is_sql_url(uri)))
    if not readable:
        print(f"ok: {spec.name} ({args.spec}) spec_sha256={spec.spec_hash()[:12]} (table not read: give --extract "
              f"<file or SQLAlchemy URL> to check its columns and holdout)")
        return EXIT_OK
    from synthfactory.ingest.table import ingest_table
    from synthfactory.keys import Keyer
    from synthfactory.synthesize.flat import prepare_table
    from synthfactory.synthesize.modelling import KEY

    store = Store()
    try:
        with tempfile.TemporaryDirectory(prefix="synthfactory-validate-") as tmp:
            report = ingest_table(spec.source, uri, tmp, keyer=Keyer(secrets.token_bytes(32)), store=store)
            table = store.read_df(report["tables"]["table"])
            _, plan = prepare_table(table, {"types": report["column_types"], "dropped": report["dropped"]}, spec,
                                    KEY)
    except SynthFactoryError as err:
        print(describe(err), file=sys.stderr)
        return exit_code_for(err)
    rows = len(table)
    for w in holdout_warnings(spec, rows):
        print(f"warning: {w}", file=sys.stderr)
    types = ", ".join(f"{c}: {t}" for c, t in report["column_types"].items())
    from synthfactory.synthesize.flat import rules_of

    rules = "; ".join(r.describe() for r in rules_of(plan)) or "none"
    print(f"ok: {spec.name} ({args.spec}) spec_sha256={spec.spec_hash()[:12]}; table: {rows} rows; column types: "
          f"{types}; logic rules: {rules}")
    return EXIT_OK


def _features_on_extract(spec, args) -> dict:  # noqa: ANN001
    import secrets
    import tempfile
    from types import SimpleNamespace

    from synthfactory.context import project_root
    from synthfactory.ingest.sources import ingest_for_run
    from synthfactory.keys import Keyer
    from synthfactory.storage import Store, join
    from synthfactory.synthesize.modelling import build_modelling_table, check_features

    if spec.source.kind in ("fhir_bulk", "fhir_search"):
        from synthfactory.errors import ConfigError

        raise ConfigError(f"validate --extract: source.kind {spec.source.kind} reads a server; give a file extract "
                          f"kind (fhir_ndjson, fhir_bundle, ehr_csv, ehr_parquet)")
    store = Store()
    source = args.extract if "://" in args.extract else str(Path(args.extract).resolve())
    with tempfile.TemporaryDirectory(prefix="synthfactory-validate-") as tmp:
        ctx = SimpleNamespace(spec=spec, source_uri=source, store=store, base_dir=str(project_root(args.spec)),
                              uri=lambda *parts: join(tmp, *parts))
        report = ingest_for_run(ctx, Keyer(secrets.token_bytes(32)))
        tables = {name: store.read_df(uri) for name, uri in report["tables"].items()}
        table, info = build_modelling_table(tables, spec.features)
        check_features(spec, table, info, tables)
    info["lab_patients"] = {n: int(table[n].notna().sum()) for n in info["labs"]}
    info["concept_patients"] = {n: int(table["cond_" + n].sum()) for n in info["concepts"]}
    return info


def _releases(spec, args) -> int:  # noqa: ANN001
    """Print the dataset's released versions (newest first) with their row counts and gate figures."""
    from synthfactory.release import catalog
    from synthfactory.release.layout import SandboxLayout

    limit = args.limit or None
    layout = SandboxLayout.for_spec(spec)
    try:
        if args.out:
            rows = catalog.local_releases(args.out, spec, limit=limit)
            where = str(catalog.local_root(args.out) / layout.dataset_prefix) + "/"
        else:
            import boto3  # default credential chain; AWS_ENDPOINT_URL points it at a non-AWS endpoint

            rows = catalog.s3_releases(boto3.client("s3"), spec, limit=limit)
            where = layout.dataset_uri
    except Exception as err:  # noqa: BLE001 - unreachable endpoint, missing bucket, no credentials
        print(f"error: cannot list releases of {spec.name}: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps({"dataset": spec.name, "location": where, "releases": rows}, indent=2, default=str))
        return EXIT_OK
    print(f"{spec.name}: {len(rows)} release(s) in {where}")
    if rows:
        print(catalog.format_table(rows))
    return EXIT_OK


def _pull(spec, args) -> int:  # noqa: ANN001
    """Download a release (latest by default) into --to and verify each file by the manifest's sha256."""
    from synthfactory.release.catalog import local_root
    from synthfactory.release.layout import SandboxLayout
    from synthfactory.release.pull import pull
    from synthfactory.release.sandbox import BucketReader, FolderReader

    layout = SandboxLayout.for_spec(spec)
    if args.out:
        reader: Any = FolderReader(local_root(args.out))
        where = str(local_root(args.out) / layout.dataset_prefix) + "/"
    else:
        import boto3  # default credential chain; AWS_ENDPOINT_URL points it at a non-AWS endpoint

        reader, where = BucketReader(boto3.client("s3"), spec.release.bucket), layout.dataset_uri
    try:
        got = pull(reader, layout, args.to, args.release_version)
    except SynthFactoryError as err:
        print(describe(err), file=sys.stderr)
        return exit_code_for(err)
    except Exception as err:  # noqa: BLE001 - unreachable endpoint, no credentials, access denied
        print(f"error: cannot pull {spec.name} from {where}: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_ERROR
    print(f"pulled {spec.name} {got['version']} from {where} to {got['dir']}: {got['files']} file(s), "
          f"{got['bytes']:,} bytes, each matching the manifest's sha256")
    return EXIT_OK


def _freeze_suite(spec, args) -> int:  # noqa: ANN001
    """Copy a run's derived suite (``quality/suite.json``) to the frozen-suite location, for users to edit."""
    from synthfactory.context import project_root
    from synthfactory.pipeline import FROZEN_SUITES_DIR
    from synthfactory.storage import Store, join

    store = Store()
    src = args.run_dir if args.run_dir.endswith(".json") else join(args.run_dir, "quality", "suite.json")
    if not store.exists(src):
        print(f"error: no derived suite at {src} (run the pipeline first; --run-dir is "
              f"<staging>/{spec.name}/runs/<run_id>)", file=sys.stderr)
        return EXIT_INPUT
    suite = store.read_json(src)
    if not isinstance(suite, dict) or not isinstance(suite.get("expectations"), list):
        print(f"error: {src} is not a GX expectation suite", file=sys.stderr)
        return EXIT_INPUT
    if args.out:
        dest = Path(args.out)
    else:
        dest = project_root(args.spec) / FROZEN_SUITES_DIR / f"{spec.name}.json"
    if dest.exists() and not args.force:
        print(f"error: {dest} exists; pass --force to overwrite it", file=sys.stderr)
        return EXIT_SPEC
    suite.pop("id", None)
    for exp in suite["expectations"]:
        exp.pop("id", None)
        exp.pop("rendered_content", None)
    suite["name"] = f"{spec.name}_frozen"
    meta = suite.setdefault("meta", {})
    meta.setdefault("synthfactory", {})["frozen_from"] = src
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(suite, indent=2) + "\n", encoding="utf-8")
    used = "" if args.out else "; the quality stage now uses it instead of deriving one"
    print(f"froze {len(suite['expectations'])} expectations to {dest}{used}. It holds aggregates of the real data "
          f"(ranges, quantiles, category sets): review it before committing it.")
    return EXIT_OK


def _run(spec, args) -> int:  # noqa: ANN001
    from synthfactory import pipeline
    from synthfactory.context import project_root
    from synthfactory.release.publish import Boto3Writer, LocalWriter
    from synthfactory.storage import Store

    now = datetime.now(timezone.utc)
    store = Store()
    try:
        ctx = pipeline.RunContext(
            spec=spec, run_id=args.run_id or "cli_" + now.strftime("%Y%m%dT%H%M%SZ"),
            version=pipeline.version_for(now), store=store, source_uri=args.extract,
            base_dir=str(project_root(args.spec)),
            staging_root=str(Path(args.out, "staging").resolve()) if args.out else None,
            profile=args.profile, rows=args.rows, synthesizer=args.synthesizer, epochs=args.epochs,
            force_ingest=args.force_ingest)
    except SynthFactoryError as err:
        print(describe(err), file=sys.stderr)
        return exit_code_for(err)
    if args.out:
        writer = LocalWriter(Path(args.out, "release").resolve())
    else:
        import boto3  # default credential chain; AWS_ENDPOINT_URL points it at a non-AWS endpoint

        from synthfactory.release.publish import client_config

        client = boto3.client("s3", config=client_config(spec.release.max_attempts))
        writer = _ResumableWriter(Boto3Writer.from_spec(client, spec.release))
    try:
        summary = pipeline.run_all(ctx, writer)
    except SynthFactoryError as err:  # a TransientError (publish): nothing partial is visible, re-run resumes
        print(describe(err), file=sys.stderr)
        return exit_code_for(err)
    except _connection_errors() as err:  # S3 staging or an s3:// extract unreachable: the stages resume too
        print(f"failed: lost the connection to S3: {type(err).__name__}: {err} (re-run to resume)", file=sys.stderr)
        return EXIT_ERROR
    except ValueError as err:  # a check the factory does not type yet: a message, not a traceback
        print(f"error: {err}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    p, q = summary["privacy"], summary["quality"]
    print(f"released {spec.name} {ctx.version} to {summary['release']['uri']} "
          f"(rows={summary['sample']['rows']} quality={q['quality_score']} "
          f"expectations={q['expectation_success_ratio']} exact_match={p['exact_match_rate']} "
          f"dcr_share={p['dcr_share']} leak_clean={p['leak_clean']})")
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
