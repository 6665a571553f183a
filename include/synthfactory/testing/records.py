"""Fixed-seed flattened FHIR tables with a longitudinal shape, for tests and benchmarks.

The demo extract (``carebundle``) has exactly one encounter per patient, all on one date, which says
nothing about children-per-parent distributions or timelines. :func:`relational_tables` builds the
same flattened tables ingest writes (:mod:`synthfactory.ingest.schemas` columns; keys are random hex,
never derived from anything real) with varying encounter counts, classes and durations, age-dependent
conditions linked to encounters, and labs measured at encounters. ``with_medications=True`` also adds
``medication_request`` and ``procedure`` tables (the shape the ingest stage produces once it flattens
MedicationRequest and Procedure).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

CONDITIONS = [  # code, display, base prevalence, extra prevalence per decade over 40
    ("I10", "Essential (primary) hypertension", 0.15, 0.08),
    ("E11.9", "Type 2 diabetes mellitus without complications", 0.06, 0.04),
    ("E78.5", "Hyperlipidemia, unspecified", 0.10, 0.05),
    ("J45.909", "Unspecified asthma, uncomplicated", 0.08, 0.0),
    ("N18.3", "Chronic kidney disease, stage 3", 0.01, 0.03),
    ("F32.9", "Major depressive disorder, single episode, unspecified", 0.07, 0.0),
]
LABS = [  # loinc, display, unit, mean, sd, diabetic shift
    ("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", "%", 5.6, 0.5, 1.8),
    ("2345-7", "Glucose [Mass/volume] in Serum or Plasma", "mg/dL", 95.0, 12.0, 45.0),
    ("39156-5", "Body mass index (BMI) [Ratio]", "kg/m2", 27.0, 4.5, 3.0),
    ("8480-6", "Systolic blood pressure", "mm[Hg]", 124.0, 14.0, 6.0),
]
CLASSES = [("AMB", "Ambulatory visit", 0.80, 0.5), ("EMER", "Emergency visit", 0.12, 4.0),
           ("IMP", "Inpatient stay", 0.08, 72.0)]
MEDICATIONS = {"E11.9": ("860975", "metformin 500 MG Oral Tablet"),
               "I10": ("314076", "lisinopril 10 MG Oral Tablet"),
               "E78.5": ("617312", "atorvastatin 20 MG Oral Tablet")}
PROCEDURES = [("73761001", "Colonoscopy"), ("252416005", "Histopathology test"), ("80146002", "Appendectomy")]


def _keys(rng: np.random.Generator, n: int) -> list[str]:
    return [rng.bytes(16).hex() for _ in range(n)]


def relational_tables(patients: int = 300, seed: int = 0, with_medications: bool = False) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    n = patients
    ref = pd.Timestamp("2026-01-01", tz="UTC")
    pkeys = _keys(rng, n)
    age = np.clip(rng.normal(52, 18, n), 1, 99)
    birth = (ref - pd.to_timedelta((age * 365.25).astype(int), unit="D")).tz_convert(None).normalize()
    gender = rng.choice(["female", "male"], n, p=[0.52, 0.48])
    race = rng.choice(["White", "Black or African American", "Asian", "Other"], n, p=[0.6, 0.2, 0.12, 0.08])
    deceased = rng.random(n) < np.clip((age - 60) / 250, 0.005, 0.2)
    patient = pd.DataFrame({
        "patient_key": pkeys, "gender": gender, "birth_date": birth.date, "birth_date_precision": "day",
        "deceased": deceased, "deceased_date": None, "race": race, "ethnicity": None, "birth_sex": None,
        "marital_status": None, "state": None,
    })

    enc_rows, cond_rows, obs_rows, med_rows, proc_rows = [], [], [], [], []
    for i in range(n):
        adult_from = max(pd.Timestamp(birth[i]).tz_localize("UTC"), ref - pd.Timedelta(days=8 * 365))
        span_days = max(1, (ref - adult_from).days - 1)
        n_enc = int(rng.poisson(1.0 + age[i] / 15.0))
        conds = [c for c in CONDITIONS
                 if rng.random() < c[2] + c[3] * max(0.0, (age[i] - 40) / 10)]
        diabetic = any(c[0] == "E11.9" for c in conds)
        if conds:
            n_enc = max(n_enc, 1)
        starts = sorted(adult_from + pd.to_timedelta(rng.integers(0, span_days, n_enc), unit="D")
                        + pd.to_timedelta(rng.integers(8, 17, n_enc), unit="h"))
        ekeys = _keys(rng, n_enc)
        for j, (ek, start) in enumerate(zip(ekeys, starts)):
            cls = CLASSES[rng.choice(len(CLASSES), p=[c[2] for c in CLASSES])]
            hours = float(rng.gamma(2.0, cls[3] / 2.0))
            end = start + pd.to_timedelta(round(hours * 60), unit="m")
            enc_rows.append((ek, pkeys[i], "finished", cls[0], None, cls[1], start, end))
            for lab in LABS:
                if rng.random() < (0.9 if lab[0] in ("39156-5", "8480-6") else 0.45 + 0.4 * diabetic):
                    value = rng.normal(lab[3] + lab[5] * diabetic, lab[4])
                    obs_rows.append((pkeys[i], ek, "laboratory" if lab[2] != "mm[Hg]" else "vital-signs",
                                     "loinc", lab[0], lab[1], start, round(float(value), 1), lab[2], None))
            if with_medications and rng.random() < 0.08:
                proc = PROCEDURES[rng.integers(len(PROCEDURES))]
                proc_rows.append((pkeys[i], ek, "snomed", proc[0], proc[1], "completed", start))
        for code, display, *_ in conds:
            j = int(rng.integers(n_enc))
            cond_rows.append((pkeys[i], ekeys[j], "icd10cm", code, display, "active", starts[j]))
            if with_medications and code in MEDICATIONS and rng.random() < 0.8:
                med = MEDICATIONS[code]
                med_rows.append((pkeys[i], ekeys[j], "rxnorm", med[0], med[1], "active", "order", starts[j]))
        if deceased[i]:
            last = starts[-1] if starts else adult_from
            patient.loc[i, "deceased_date"] = (last + pd.Timedelta(days=int(rng.integers(1, 300)))).date()

    encounter = pd.DataFrame(enc_rows, columns=["encounter_key", "patient_key", "status", "class_code", "type_code",
                                                "type_display", "start", "end"])
    condition = pd.DataFrame(cond_rows, columns=["patient_key", "encounter_key", "code_system", "code", "display",
                                                 "clinical_status", "onset"])
    condition.insert(0, "condition_key", _keys(rng, len(condition)))
    observation = pd.DataFrame(obs_rows, columns=["patient_key", "encounter_key", "category", "code_system", "code",
                                                  "display", "effective", "value_num", "unit", "value_code"])
    observation.insert(0, "observation_key", _keys(rng, len(observation)))
    patient["birth_date"] = pd.to_datetime(patient["birth_date"]).dt.date
    out = {"patient": patient, "encounter": encounter, "condition": condition, "observation": observation}
    if with_medications:
        med = pd.DataFrame(med_rows, columns=["patient_key", "encounter_key", "code_system", "code", "display",
                                              "status", "intent", "authored_on"])
        med.insert(0, "medication_request_key", _keys(rng, len(med)))
        proc = pd.DataFrame(proc_rows, columns=["patient_key", "encounter_key", "code_system", "code", "display",
                                                "status", "performed"])
        proc.insert(0, "procedure_key", _keys(rng, len(proc)))
        out.update({"medication_request": med, "procedure": proc})
    return out


def write_extract(dest: str, patients: int = 200, seed: int = 0, with_medications: bool = False) -> str:
    """:func:`relational_tables` as a FHIR R4 NDJSON extract (``<Type>.ndjson``), for pipeline tests: real-shaped
    input with a longitudinal record, produced by :mod:`synthfactory.synthesize.fhir_out`."""
    from synthfactory.synthesize.fhir_out import write_fhir_ndjson

    tables = relational_tables(patients, seed, with_medications)
    write_fhir_ndjson(tables, dest, sample_validate=10, seed=seed)
    return dest
