"""The gate: the spec's thresholds decide whether a synthetic dataset may leave staging.

The decision record lists every check with its figure, threshold and margin, and the sha256 of each
audited file. The publisher refuses any file whose content does not match the audited hash.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from synthfactory.spec import PrivacyThresholds, QualityThresholds
from synthfactory.errors import EXIT_GATE, RefusedError


class GateRefused(RefusedError, RuntimeError):
    """A gate failed; ``decision`` holds the full record. The message says which gate and by how much."""

    exit_code = EXIT_GATE
    label = "gate refused"

    def __init__(self, message: str, decision: dict):
        super().__init__(message)
        self.decision = decision


@dataclass(frozen=True)
class Check:
    gate: str
    name: str
    value: float | None
    op: str  # ">=" or "<=" or "=="
    threshold: float | bool
    passed: bool
    reference: dict | None = None  # what real data itself scores on this figure: {mean, sd, ...}
    certified: bool | None = None  # None: not a certification; False: passed without certifying (see result)
    rule: str | None = None  # the rule in words, where the name alone does not say it (relational tables)

    @property
    def result(self) -> str:
        """``pass``, ``FAIL``, or ``not certified``: a check that passed on a bound that cannot certify (an
        anonymeter risk judged on the lower end of a wide interval: no evidence of risk, no proof of safety)."""
        if not self.passed:
            return "FAIL"
        return "not certified" if self.certified is False else "pass"

    def describe(self) -> str:
        text = self._describe()
        return f"{text} [rule: {self.rule}]" if self.rule else text

    def _describe(self) -> str:
        if self.op == "==":
            return f"{self.gate} gate failed: {self.name} is {self.value} (required {self.threshold})"
        if self.value is None:
            return f"{self.gate} gate failed: {self.name} could not be measured"
        limit = "min" if self.op == ">=" else "max"
        by = abs(self.value - float(self.threshold))
        rel = "<" if self.op == ">=" else ">"
        ref = ""
        if self.reference and self.reference.get("mean") is not None:
            ref = f"; real data itself: {self.reference['mean']:.4g} ± {self.reference.get('sd') or 0:.2g}"
        return (f"{self.gate} gate failed: {self.name} {self.value:.4g} {rel} {limit} {float(self.threshold):.4g} "
                f"(by {by:.4g}{ref})")


def ge(gate: str, name: str, value: float | None, threshold: float, reference: dict | None = None,
       rule: str | None = None) -> Check:
    """A check that passes when ``value >= threshold`` (a missing figure fails)."""
    return Check(gate, name, value, ">=", threshold, value is not None and value >= threshold, reference, rule=rule)


def le(gate: str, name: str, value: float | None, threshold: float, reference: dict | None = None,
       rule: str | None = None) -> Check:
    """A check that passes when ``value <= threshold`` (a missing figure fails)."""
    return Check(gate, name, value, "<=", threshold, value is not None and value <= threshold, reference, rule=rule)


def is_true(gate: str, name: str, value: bool | None, rule: str | None = None) -> Check:
    return Check(gate, name, value, "==", True, value is True, rule=rule)


RELATIVE_FIGURES = (("quality_score", "quality_fraction", "min_quality_score"),
                    ("column_pair_trends", "pair_trends_fraction", "min_pair_trends"),
                    ("min_column_score", "column_fraction", "min_column_score"))


def quality_checks(quality: dict, qt: QualityThresholds) -> list[Check]:
    """Quality figures from the quality stage summary, each judged against the real-data reference the
    summary carries (``reference``: real held-out rows vs real train rows, see
    :mod:`synthfactory.quality.reference`): a figure fails when it is below ``fraction`` x the reference
    mean by more than ``noise_z`` reference standard deviations. A spec's absolute floor (``min_*``), when
    set, is checked as well (``<figure>.floor``). A relationship or the ML utility that the data is too small
    to measure (summary status ``skipped``) gets no check; any other missing figure fails. A relationship
    whose real effect is significant must also keep it: the interval of synthetic/real effect must reach
    ``[min_effect_kept, max_effect_kept]``."""
    from synthfactory.quality.reference import relative_threshold

    rs = qt.reference
    reference = quality.get("reference") or {}
    matched = quality.get("matched") or {}  # figures at the reference's row count, when the stage gives them
    # the suite's expectations: the spec's share, or what real held-out rows pass (minus noise) when lower
    ref_exp = reference.get("expectation_success_ratio")
    real_exp = relative_threshold(ref_exp, 1.0, rs.noise_z)
    exp_threshold = qt.min_expectation_success if real_exp is None else min(qt.min_expectation_success,
                                                                          round(real_exp, 4))
    # at the held-out row count when the stage gives it (the whole table's share is in the report beside it)
    exp_value = matched.get("expectation_success_ratio")
    if exp_value is None:
        exp_value = quality.get("expectation_success_ratio")
    checks = [ge("quality", "expectation_success_ratio", exp_value, exp_threshold, ref_exp)]
    for figure, fraction, floor_name in RELATIVE_FIGURES:
        value, ref = matched.get(figure, quality.get(figure)), reference.get(figure)
        threshold = relative_threshold(ref, getattr(rs, fraction), rs.noise_z)
        if threshold is not None:
            checks.append(ge("quality", figure, value, round(threshold, 4), ref))
        floor = getattr(qt, floor_name)
        if floor is not None:
            checks.append(ge("quality", f"{figure}.floor", value, floor, ref))
        if threshold is None and floor is None and value is None and ref is None and figure != "column_pair_trends":
            checks.append(ge("quality", figure, None, 0.0))  # neither measured nor referenced: fail loudly
    measured = quality.get("relationships") or {}
    for rel in qt.relationships:
        got = measured.get(rel.name) or {}
        if got.get("status") == "skipped":
            continue
        # the group difference beyond sampling noise (the shape)
        checks.append(le("quality", f"relationship.{rel.name}", got.get("max_excess"), rel.tolerance))
        effect = got.get("effect") or {}
        if effect.get("significant"):  # a real effect to keep
            ref = ((reference.get("relationships") or {}).get(rel.name) or {}).get("effect_kept")
            checks.append(ge("quality", f"relationship.{rel.name}.effect_kept.ci_high", effect.get("ci_high"),
                             rel.min_effect_kept, ref))
            checks.append(le("quality", f"relationship.{rel.name}.effect_kept.ci_low", effect.get("ci_low"),
                             rel.max_effect_kept, ref))
    # relational mode: every table gated beside its own real-data reference (quality.tables.gate_tables)
    for name, table in ((quality.get("tables") or {}).get("tables") or {}).items():
        for row in table.get("checks") or []:
            label = f"table.{name}.{row['figure']}"
            ref = None if row.get("reference") is None else {"mean": row["reference"]}
            if row["op"] == ">=":
                checks.append(ge("quality", label, row.get("value"), row["threshold"], ref, row.get("rule")))
            elif row["op"] == "<=":
                checks.append(le("quality", label, row.get("value"), row["threshold"], ref, row.get("rule")))
            else:
                checks.append(is_true("quality", label, row.get("value"), row.get("rule")))
    if qt.utility is not None and quality.get("utility_status") != "skipped":
        checks.append(ge("quality", f"utility_ratio.{qt.utility.target}", quality.get("utility_ratio"),
                         qt.min_utility_ratio))
    return checks


def _upper(ref: dict | None, z: float, cap: float | None) -> float | None:
    """``mean + z sd`` of a privacy reference, never above ``cap`` (None: no reference and no cap)."""
    if ref and ref.get("mean") is not None:
        thr = float(ref["mean"]) + z * float(ref.get("sd") or 0.0)
        return round(thr if cap is None else min(thr, float(cap)), 4)
    return None if cap is None else float(cap)


def privacy_checks(privacy: dict, pt: PrivacyThresholds) -> list[Check]:
    """Privacy figures from the privacy stage summary, each judged against the real-data reference the
    summary carries (``reference``: fresh real rows scored like the synthetic table over re-splits, see
    :mod:`synthfactory.privacy.reference`) and put beside its check:

    * ``exact_match_rate`` fails above the reference mean + ``noise_z`` sd, or above ``max_exact_match_rate``
      when set (without a reference: above the cap, or above 0);
    * ``dcr_share`` fails above the reference mean + ``noise_z`` sd, never passing above ``max_dcr_share``;
      ``dcr_share.holdout_leak`` (two-sided) fails below the reference mean - ``noise_z`` sd: synthetic rows
      markedly closer to the holdout than fresh real rows are, i.e. real rows the model never trained on
      leaked into the output (only with a reference);
    * ``dcr_ratio`` fails below ``min_dcr_ratio``;
    * ``mia_auc`` fails above the reference mean + ``noise_z`` sd, never passing above ``max_mia_auc``;
    * ``rare_record_mia_auc.lower_bound`` (with quasi-identifiers): the rare-record membership AUC minus
      ``noise_z`` standard errors fails above ``max_rare_record_mia_auc`` (members significantly closer to
      the synthetic rows than non-members). Skipped, as the stage reports, when the data hold too few rare
      records to test; not measured otherwise: refused.
    """
    ref = privacy.get("reference") or {}
    z = float(pt.noise_z)
    em_ref, dcr_ref = ref.get("exact_match_rate"), ref.get("dcr_share")
    em_thr = _upper(em_ref, z, pt.max_exact_match_rate)
    checks = [le("privacy", "exact_match_rate", privacy.get("exact_match_rate"), 0.0 if em_thr is None else em_thr,
                 em_ref),
              le("privacy", "dcr_share", privacy.get("dcr_share"), _upper(dcr_ref, z, pt.max_dcr_share), dcr_ref)]
    if dcr_ref and dcr_ref.get("mean") is not None:
        low = round(float(dcr_ref["mean"]) - z * float(dcr_ref.get("sd") or 0.0), 4)
        checks.append(ge("privacy", "dcr_share.holdout_leak", privacy.get("dcr_share"), low, dcr_ref))
    checks.append(ge("privacy", "dcr_ratio", privacy.get("dcr_ratio"), pt.min_dcr_ratio, ref.get("dcr_ratio")))
    if pt.leak_scan:
        checks.append(is_true("privacy", "leak_scan_clean", privacy.get("leak_clean")))
    checks.append(le("privacy", "mia_auc", privacy.get("mia_auc"), _upper(ref.get("mia_auc"), z, pt.max_mia_auc),
                     ref.get("mia_auc")))
    if pt.quasi_identifiers and privacy.get("rare_record_mia_status") != "skipped":
        auc, se = privacy.get("rare_record_mia_auc"), privacy.get("rare_record_mia_se")
        lower = None if auc is None or se is None else round(float(auc) - z * float(se), 4)
        checks.append(le("privacy", "rare_record_mia_auc.lower_bound", lower, pt.max_rare_record_mia_auc,
                         ref.get("rare_record_mia_auc")))
    checks += anonymeter_checks(privacy, pt)
    checks += mia_checks(privacy, pt)
    if privacy.get("record") is not None:
        checks += record_checks(privacy, pt)
    return checks


#: the record-level attacks the relational privacy stage measures (privacy.record_mia.RECORD_ATTACKS)
RECORD_ATTACKS = ("partial_distance", "partial_domias")


def record_checks(privacy: dict, pt: PrivacyThresholds) -> list[Check]:
    """Relational mode: a patient's whole record is the unit (:mod:`synthfactory.privacy.records`,
    :mod:`synthfactory.privacy.record_mia`). Each figure of the privacy summary's ``record`` is judged against
    its real-data reference (fresh real records as the release, over re-splits) as the single-table figures
    are: above the reference mean + ``noise_z`` sd, or above the single-table cap, refuses.

    * ``record.exact_match_rate`` / ``record.dcr_share``: the record vectors' exact match and DCR share (caps:
      ``max_exact_match_rate``, ``max_dcr_share``);
    * ``record.partial_exact_match_rate``: members singled out by the facts an attacker knows (no cap);

    the two rates count records, so their slack is never below the binomial noise of the count
    (``noise_z`` standard errors of a rate of at least one record in ``n``: one or two coincidental matches
    among hundreds of records, which fresh real records also show across re-splits, do not refuse alone);
    * ``record.mia.<attack>.auc.ci_low`` and ``.tpr_at_fpr_01.ci_low``: each partial-knowledge attack's lower
      95 % bound (significant evidence, as the battery) against the reference + margin, capped at
      ``mia.max_auc`` / ``mia.max_tpr_at_fpr_01`` (a TPR at 1 % FPR only where resolved: >= 100 non-members).

    An expected attack neither measured nor skipped for a stated reason, or a summary without the record
    figures, fails (``record.measured``)."""
    rec = privacy.get("record")
    if not rec:
        return [is_true("privacy", "record.measured", False)]
    z = float(pt.noise_z)
    checks = []
    counts = {"exact_match_rate": rec.get("synthetic_records"),
              "partial_exact_match_rate": rec.get("partial_exact_match_targets")}
    for fig, cap in (("exact_match_rate", pt.max_exact_match_rate), ("dcr_share", pt.max_dcr_share),
                     ("partial_exact_match_rate", None)):
        ref = rec.get(f"{fig}_reference")
        thr = _upper(ref, z, cap)
        n = counts.get(fig)
        if thr is not None and n and ref and ref.get("mean") is not None:
            p0 = max(float(ref["mean"]), 1.0 / n)
            floor = round(float(ref["mean"]) + z * (p0 * (1.0 - p0) / n) ** 0.5, 4)
            thr = max(thr, floor if cap is None else min(floor, float(cap)))
        checks.append(le("privacy", f"record.{fig}", rec.get(fig), 0.0 if thr is None else thr, ref))
    attacks = rec.get("mia") or {}
    for name in RECORD_ATTACKS:
        a = attacks.get(name)
        if a is None:
            checks.append(is_true("privacy", f"record.mia.{name}.measured", False))
            continue
        if a.get("status") != "measured":
            continue  # skipped for a stated reason (too few held-out records)
        for fig, cap in (("auc", pt.mia.max_auc), ("tpr_at_fpr_01", pt.mia.max_tpr_at_fpr_01)):
            if fig != "auc" and a.get(f"{fig}_resolved") is False:
                continue
            ref = a.get(f"{fig}_reference")
            low = (a.get(f"{fig}_ci") or [None, None])[0]
            checks.append(le("privacy", f"record.mia.{name}.{fig}.ci_low", low if low is not None else a.get(fig),
                             _upper(ref, z, cap), ref))
    return checks


MIA_FIGURES = (("auc", "max_auc"), ("tpr_at_fpr_01", "max_tpr_at_fpr_01"), ("tpr_at_fpr_10", "max_tpr_at_fpr_10"))


def mia_rule(battery: dict | None, pt: PrivacyThresholds) -> dict:
    """How the membership-inference battery is judged (see :class:`~synthfactory.spec.MiaThresholds`): per
    gated figure, the largest lower 95 % bound over the measured attacks must not exceed its threshold
    (significant evidence from any one attack refuses). ``certified``: every expected attack measured and
    every upper bound within its threshold and every gated TPR resolved (at least 1/FPR non-members: a TPR at
    1 % FPR over 40 non-members is not a measurement, and it is left out of the gated maximum); otherwise
    the intervals are too wide to conclude ("not certified"), which refuses only with
    ``require_certification``. ``missing``: expected attacks that were
    neither measured nor skipped for a stated reason (refused)."""
    battery = battery or {}
    attacks = battery.get("attacks") or {}
    mt = pt.mia
    measured = {a: v for a, v in attacks.items() if v.get("status") == "measured"}
    missing = [a for a in mt.attacks if a not in attacks]
    uncertain: list[str] = []
    for fig, limit_name in MIA_FIGURES:
        limit = getattr(mt, limit_name)
        if limit is None:
            continue
        for a, v in measured.items():
            hi = (v.get(f"{fig}_ci") or [None, None])[1]
            if hi is None or hi > limit or v.get(f"{fig}_resolved") is False:
                uncertain.append(f"{a}.{fig}")
    skipped = [a for a in mt.attacks if a in attacks and a not in measured]
    certified = bool(measured) and not missing and not skipped and not uncertain
    return {"certified": certified, "uncertain": uncertain, "missing": missing, "skipped": skipped}


def mia_checks(privacy: dict, pt: PrivacyThresholds) -> list[Check]:
    """The battery's checks: ``mia.max_<figure>.ci_low`` (largest lower bound over the attacks) against
    ``privacy.mia.max_<figure>``, an expected attack that is not in the summary fails, and with
    ``require_certification`` ``mia.certified``."""
    mt = pt.mia
    if not mt.attacks:
        return []
    battery = privacy.get("mia_battery")
    if not battery:
        return [le("privacy", "mia.max_auc.ci_low", None, mt.max_auc)]
    rule = mia_rule(battery, pt)
    checks = [le("privacy", f"mia.{a}", None, mt.max_auc) for a in rule["missing"]]
    any_measured = any(v.get("status") == "measured" for v in (battery.get("attacks") or {}).values())
    for fig, limit_name in MIA_FIGURES:
        limit = getattr(mt, limit_name)
        if limit is None or not any_measured or battery.get(f"max_{fig}") is None:
            continue  # no attack measured, or (a TPR) none with enough non-members: not certified
        ref = None
        attack = battery.get(f"max_{fig}_attack")
        if attack:
            ref = (battery["attacks"].get(attack) or {}).get(f"{fig}_reference")
        checks.append(le("privacy", f"mia.max_{fig}.ci_low", battery.get(f"max_{fig}_ci_low"), limit, ref))
    if mt.require_certification:
        checks.append(is_true("privacy", "mia.certified", rule["certified"]))
    return checks


def expected_anonymeter_risks(pt: PrivacyThresholds) -> list[str]:
    """The anonymeter risks the privacy stage measures for these thresholds (see privacy.attacks)."""
    qis, sens = pt.quasi_identifiers, pt.sensitive_attributes
    if pt.anonymeter_attacks <= 0 or not (qis or sens):
        return []
    names = ["singling_out"]
    if qis and sens:
        names.append("linkability")
    if qis:
        names += [f"inference:{s}" for s in sens]
    return names


def anonymeter_rule(risk: dict | None, pt: PrivacyThresholds) -> dict:
    """How one anonymeter risk is judged. The interval is *powered* when at least
    ``anonymeter_min_attacks`` attacks ran and its half-width is at most half of ``max_anonymeter_risk``
    (then a risk-free dataset certifies with >= 97.5 % probability): its upper end must not exceed the
    threshold. Otherwise the data are too few to certify anything and only significant evidence of risk
    refuses: the lower end must not exceed the threshold. ``certified`` = enough attacks and upper end
    within the threshold."""
    risk = risk or {}
    n, err, hi = risk.get("n"), risk.get("error"), risk.get("ci_high")
    enough = n is not None and n >= pt.anonymeter_min_attacks
    powered = bool(enough and err is not None and err <= pt.max_anonymeter_risk / 2)
    certified = bool(enough and hi is not None and hi <= pt.max_anonymeter_risk)
    return {"powered": powered, "certified": certified, "bound": "ci_high" if powered else "ci_low"}


def anonymeter_checks(privacy: dict, pt: PrivacyThresholds) -> list[Check]:
    measured = privacy.get("anonymeter_risks") or {}
    checks = []
    for name in expected_anonymeter_risks(pt):
        risk = measured.get(name)
        rule = anonymeter_rule(risk, pt)
        value = (risk or {}).get(rule["bound"])
        c = le("privacy", f"anonymeter.{name}.{rule['bound']}", value, pt.max_anonymeter_risk)
        checks.append(Check(**{**asdict(c), "certified": rule["certified"]}))
        if pt.require_anonymeter_certification:
            checks.append(is_true("privacy", f"anonymeter.{name}.certified", rule["certified"]))
    return checks


def decide(quality: dict, privacy: dict, qt: QualityThresholds, pt: PrivacyThresholds,
           audited_files: dict[str, str], profile: str = "default") -> dict:
    """Evaluate every check of every gate. ``quality``/``privacy`` are the stage summaries; ``audited_files``
    maps the release-relative path of each file to its sha256. Stages may add checks of their own: a
    summary's ``extra_checks`` (list of Check dicts) is evaluated as recorded."""
    checks = [*quality_checks(quality, qt), *privacy_checks(privacy, pt)]
    if (quality.get("tables") or {}).get("tables") and privacy.get("record") is None:
        checks.append(is_true("privacy", "record.measured", False))  # relational mode: the record must be audited
    for summary in (quality, privacy):
        checks += [Check(**{k: v for k, v in c.items() if k != "result"}) for c in summary.get("extra_checks", [])]
    failed = [c for c in checks if not c.passed]
    uncertified = [c.name for c in checks if c.result == "not certified"]
    passed = "all gates passed" + (f" ({len(uncertified)} not certified: {', '.join(uncertified)})"
                                   if uncertified else "")
    return {
        "approved": not failed,
        "profile": profile,
        "checks": [{**asdict(c), "result": c.result} for c in checks],
        "failed": [c.describe() for c in failed],
        "not_certified": uncertified,
        "message": "; ".join(c.describe() for c in failed) if failed else passed,
        "audited_files": dict(sorted(audited_files.items())),
    }
