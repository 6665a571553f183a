"""Arrow schemas of the flattened FHIR tables written by :mod:`synthfactory.ingest.session`.

Every column is nullable except each table's own pseudonymous key. Key columns hold 32-hex salted
HMACs (see :mod:`synthfactory.keys`), never source ids.
"""

from __future__ import annotations

import pyarrow as pa

TS = pa.timestamp("us", tz="UTC")

PATIENT_SCHEMA = pa.schema([
    pa.field("patient_key", pa.string(), nullable=False),
    pa.field("gender", pa.string()),
    pa.field("birth_date", pa.date32()),
    pa.field("birth_date_precision", pa.string()),  # "year" | "month" | "day"
    pa.field("deceased", pa.bool_()),
    pa.field("deceased_date", pa.date32()),
    pa.field("race", pa.string()),
    pa.field("ethnicity", pa.string()),
    pa.field("birth_sex", pa.string()),
    pa.field("marital_status", pa.string()),
    pa.field("state", pa.string()),
])

ENCOUNTER_SCHEMA = pa.schema([
    pa.field("encounter_key", pa.string(), nullable=False),
    pa.field("patient_key", pa.string()),
    pa.field("status", pa.string()),
    pa.field("class_code", pa.string()),
    pa.field("type_code", pa.string()),
    pa.field("type_display", pa.string()),
    pa.field("start", TS),
    pa.field("end", TS),
])

CONDITION_SCHEMA = pa.schema([
    pa.field("condition_key", pa.string(), nullable=False),
    pa.field("patient_key", pa.string()),
    pa.field("encounter_key", pa.string()),
    pa.field("code_system", pa.string()),  # "icd10cm" | "snomed" | "loinc" | "rxnorm" | raw system URI
    pa.field("code", pa.string()),
    pa.field("display", pa.string()),
    pa.field("clinical_status", pa.string()),
    pa.field("onset", TS),
])

OBSERVATION_SCHEMA = pa.schema([
    pa.field("observation_key", pa.string(), nullable=False),
    pa.field("patient_key", pa.string()),
    pa.field("encounter_key", pa.string()),
    pa.field("category", pa.string()),
    pa.field("code_system", pa.string()),
    pa.field("code", pa.string()),
    pa.field("display", pa.string()),
    pa.field("effective", TS),
    pa.field("value_num", pa.float64()),
    pa.field("unit", pa.string()),
    pa.field("value_code", pa.string()),
])

IDENTIFIERS_SCHEMA = pa.schema([
    pa.field("value", pa.string(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),  # id | identifier | name | family | address | telecom
])

#: FHIR resource type -> (table name, schema)
TABLES: dict[str, tuple[str, pa.Schema]] = {
    "Patient": ("patient", PATIENT_SCHEMA),
    "Encounter": ("encounter", ENCOUNTER_SCHEMA),
    "Condition": ("condition", CONDITION_SCHEMA),
    "Observation": ("observation", OBSERVATION_SCHEMA),
}
