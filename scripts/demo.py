"""`make demo`: the factory end to end on embedded defaults.

1. a sample FHIR R4 extract generated offline (carebundle) in data/sample_extract/
2. moto's S3 server on 127.0.0.1 as the sandbox, with the sandbox bucket
3. Airflow 3 on SQLite in .airflow/, the connection `sandbox_s3` pointing at the emulator
4. `airflow dags test synthfactory_cohort_demo` runs every task for real
5. prints where the approved dataset landed with its gate figures, and mirrors it to released/
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from synthfactory.testing import dev
from synthfactory.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", default=str(ROOT / "include/datasets/cohort_demo.yaml"))
    ap.add_argument("--patients", type=int, default=600, help="patients in the generated sample extract")
    ap.add_argument("--conf", default="{}", help="DAG run conf (Params) as JSON, e.g. '{\"rows\": 2000}'")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # progress shows as it happens, on a terminal or piped to a file

    spec = load_spec(args.spec)
    dag_id = f"synthfactory_{spec.name}"
    extract = ROOT / spec.source.uri
    print(f"[1/5] sample extract: {dev.generate_sample_extract(extract, patients=args.patients)}")

    with dev.S3Emulator() as s3:
        client = s3.client()
        client.create_bucket(Bucket=spec.release.bucket)
        print(f"[2/5] S3 sandbox emulator at {s3.endpoint}, bucket {spec.release.bucket}")

        env = dev.airflow_env(ROOT, ROOT / ".airflow", s3.endpoint)
        dev.ensure_airflow_db(env)
        print(f"[3/5] Airflow home .airflow/ (SQLite), connection {dev.SANDBOX_CONN_ID} -> emulator")

        log_path = ROOT / ".airflow" / "demo_dag_test.log"
        print(f"[4/5] airflow dags test {dag_id}: every task for real, about 1-2 minutes (full log: "
              f"{log_path.relative_to(ROOT)})", flush=True)
        proc = dev.dags_test(dag_id, env, conf=json.loads(args.conf), log_path=log_path,
                             on_line=dev.TaskProgress(lambda text: print(text, flush=True)))
        dataset_prefix = f"{spec.release.prefix}/{spec.name}".strip("/")
        versions = dev.list_versions(client, spec.release.bucket, dataset_prefix)
        if proc.returncode != 0 or not versions:
            tail = log_path.read_text(errors="replace").splitlines()[-40:]
            print("\n".join(tail))
            reasons = [ln for ln in tail if "gate failed" in ln or "Error" in ln]
            print(f"\nDAG run failed (exit {proc.returncode}); nothing was released. "
                  f"{reasons[-1].strip() if reasons else ''}", file=sys.stderr)
            return 1
        version = dev.latest_version(client, spec.release.bucket, dataset_prefix)  # what latest.json names
        key_prefix = f"{dataset_prefix}/{version}"
        manifest = json.loads(client.get_object(Bucket=spec.release.bucket,
                                                Key=f"{key_prefix}/manifest.json")["Body"].read())
        local = ROOT / "released" / spec.name / version
        files = dev.mirror(client, spec.release.bucket, key_prefix, local)

    f = manifest["figures"]
    print(f"[5/5] released s3://{spec.release.bucket}/{key_prefix}/")
    for entry in manifest["files"]:
        rows = f", {entry['rows']} rows" if entry.get("rows") is not None else ""
        print(f"      {entry['path']:<26} sha256 {entry['sha256'][:16]}…{rows}")
    quality = json.loads((local / "reports" / "quality.json").read_text())
    privacy = json.loads((local / "reports" / "privacy.json").read_text())
    q_syn, q_ref = (quality.get("matched") or {}).get("quality_score") or {}, \
        (quality.get("reference") or {}).get("quality_score") or {}
    d_ref = (privacy.get("reference") or {}).get("dcr_share") or {}
    print("      gates, each beside what real data itself scores (real held-out vs train rows, mean ± sd):")
    print(f"        quality score {_f(q_syn.get('mean'))} at the holdout's row count vs {_f(q_ref.get('mean'))} ± "
          f"{_f(q_ref.get('sd'))}; expectations passed {f['expectation_success_ratio']:.0%}")
    print(f"        DCR share {f['dcr_share']} vs {_f(d_ref.get('mean'))} ± {_f(d_ref.get('sd'))}; exact matches "
          f"{f['exact_match_rate']}; DCR ratio {f['dcr_ratio']}; leak scan {'clean' if f['leak_clean'] else 'HITS'}")
    if f.get("mia_auc") is not None:
        risks = ", ".join(f"{k} {v['risk']} [{v['ci_low']}, {v['ci_high']}] n={v['n']}"
                          for k, v in (f.get("anonymeter_risks") or {}).items())
        note = "" if f.get("anonymeter_certified") else " (not all certified: holdout too small, see privacy.json)"
        rare = f.get("rare_record_mia_auc")
        rare = "not measured (too few rare records)" if rare is None else rare
        print(f"        membership-inference AUC {f['mia_auc']} (0.5 ideal), on rare records {rare}; anonymeter "
              f"{risks or 'not run'}{note}")
    print(f"      latest: s3://{spec.release.bucket}/{dataset_prefix}/latest.json -> {version} "
          f"(SSE {manifest.get('encryption') or 'n/a'}, tags dataset/version/synthetic=true)")
    print(f"      mirrored {len(files)} files to {local.relative_to(ROOT)}/")
    card = local / "reports" / "datacard.html"
    if card.is_file():
        print(f"      data card: {card}  (open it in a browser: figures, their meaning, the data dictionary)")
    return 0


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


if __name__ == "__main__":
    sys.exit(main())
