"""``synthfactory`` command: run the factory for a spec without Airflow, or validate a spec.

Exit codes: 0 released (or spec valid) · 2 invalid spec or usage · 3 bad input (extract missing,
empty, too few patients) · 4 a gate refused (dataset quarantined, nothing released) · 5 the publisher
refused · 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path

EXIT_OK, EXIT_ERROR, EXIT_SPEC, EXIT_INPUT, EXIT_GATE, EXIT_PUBLISH = 0, 1, 2, 3, 4, 5


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="synthfactory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("validate", help="validate a dataset spec")
    v.add_argument("spec")
    r = sub.add_parser("run", help="run the whole pipeline for a spec, in-process")
    r.add_argument("spec")
    r.add_argument("--extract", help="extract URI (local folder or s3://); overrides the spec's source.uri")
    r.add_argument("--out", help="local folder for staging and the release, instead of the spec's targets")
    r.add_argument("--rows", type=int, help="synthetic rows to sample")
    r.add_argument("--profile", default="default", help="threshold profile from the spec")
    r.add_argument("--synthesizer", help="synthesizer kind, overriding the spec")
    r.add_argument("--run-id", help="run id (default: a UTC timestamp)")
    r.add_argument("--json", action="store_true", help="print the run summary as JSON on stdout")
    r.add_argument("-q", "--quiet", action="store_true", help="only warnings and the result line")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from synthfactory.spec import SpecError, load_spec

    try:
        spec = load_spec(args.spec)
    except SpecError as err:
        print(f"invalid spec: {err}", file=sys.stderr)
        return EXIT_SPEC
    if args.cmd == "validate":
        print(f"ok: {spec.name} ({args.spec}) spec_sha256={spec.spec_hash()[:12]}")
        return EXIT_OK
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return _run(spec, args)


def _run(spec, args) -> int:  # noqa: ANN001
    from synthfactory import pipeline
    from synthfactory.ingest.fhir_ndjson import ExtractError
    from synthfactory.release.gate import GateRefused
    from synthfactory.release.publish import Boto3Writer, LocalWriter, PublishRefused
    from synthfactory.spec import SpecError
    from synthfactory.storage import Store
    from synthfactory.synthesize.modelling import ModellingError

    now = datetime.now(timezone.utc)
    store = Store()
    try:
        ctx = pipeline.RunContext(
            spec=spec, run_id=args.run_id or "cli_" + now.strftime("%Y%m%dT%H%M%SZ"),
            version=pipeline.version_for(now), store=store, source_uri=args.extract,
            staging_root=str(Path(args.out, "staging").resolve()) if args.out else None,
            profile=args.profile, rows=args.rows, synthesizer=args.synthesizer)
    except SpecError as err:
        print(f"invalid spec: {err}", file=sys.stderr)
        return EXIT_SPEC
    if args.out:
        writer = LocalWriter(Path(args.out, "release").resolve())
    else:
        import boto3  # default credential chain; AWS_ENDPOINT_URL points it at a non-AWS endpoint

        writer = Boto3Writer(boto3.client("s3"), spec.release.bucket)
    try:
        summary = pipeline.run_all(ctx, writer)
    except GateRefused as err:
        print(f"gate refused: {err}", file=sys.stderr)
        return EXIT_GATE
    except (ExtractError, ModellingError) as err:
        print(f"bad input: {err}", file=sys.stderr)
        return EXIT_INPUT
    except PublishRefused as err:
        print(f"publish refused: {err}", file=sys.stderr)
        return EXIT_PUBLISH
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_SPEC if "synthesizer." in str(err) else EXIT_ERROR
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
