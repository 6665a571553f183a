"""FHIR R4 semantics with no I/O: normalisation rules (dates, codings, references), the FHIRPath subset and
the SQL-on-FHIR v2 ViewDefinition compiler. The spec validates inline views with it and every ingest source
flattens with it; it imports nothing of the stages."""
