"""A flat clinical table (``source.kind: table``) through the patient-table path: its typed columns, its logic
rules, and the output in the input's own columns, dtypes and value sets.

* :func:`prepare_table` turns the ingested table into the modelling table (the input's columns, minus the
  identifier and excluded ones) and the table plan (``model/table.json``): column types, dtypes, the value sets
  of category-typed columns, and the logic rules (detected and the spec's).
* :func:`detect_rules` finds the table's logic from the data: a column set only when another has a value or
  one of some values (cause of death only if dead), set whenever it does, and flags never set together.
  A rule is kept only when the data give evidence for it: at least ``min_support`` rows on each side and at
  least ``min_expected`` violations expected were the two columns independent, with none observed.
* :func:`violations` marks the rows breaking any rule; :func:`rule_sampler` redraws them at sampling, so every
  synthetic row keeps every rule (counted in the synthesis report).
* :func:`conform` casts a synthetic batch to the real table's dtypes (integers stay integers, a 0/1 flag stays
  0/1, dates stay dates).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd

from synthfactory.errors import InputError

log = logging.getLogger(__name__)

CATEGORY_TYPES = ("ordinal", "categorical", "boolean", "sex")
TABLE_PLAN = "table.json"


class RuleError(InputError, ValueError):
    """A spec rule names an unknown column, the real table breaks it, or sampling cannot keep it."""


@dataclass(frozen=True)
class Rule:
    type: str                   # only_when | required_when | exclusive
    column: str
    other: str
    values: tuple | None = None
    source: str = "detected"    # detected | spec
    support: int = 0            # real rows where the antecedent holds

    def describe(self) -> str:
        cond = "has a value" if self.values is None else f"is one of {list(self.values)}"
        if self.type == "only_when":
            return f"{self.column} set only when {self.other} {cond}"
        if self.type == "required_when":
            return f"{self.column} set whenever {self.other} {cond}"
        return f"{self.column} and {self.other} never set together"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["values"] = None if self.values is None else list(self.values)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Rule":
        return cls(**{**d, "values": None if d.get("values") is None else tuple(d["values"])})


def _py(v: Any) -> Any:
    """A JSON-able scalar of the column's own kind (numpy scalars to Python)."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, pd.Timestamp):
        return v.isoformat()
    return v


def true_value(s: pd.Series) -> Any:
    """The value meaning "set" of a boolean-typed column (True, 1, 'yes', ...)."""
    if pd.api.types.is_bool_dtype(s.dtype):
        return True
    vals = [v for v in pd.unique(s.dropna())]
    for v in vals:
        if str(v).strip().lower() in ("1", "1.0", "true", "t", "yes", "y"):
            return _py(v)
    return _py(sorted(vals, key=str)[-1]) if vals else True


def active(df: pd.DataFrame, col: str, types: dict[str, str], truth: dict[str, Any]) -> pd.Series:
    """Where ``col`` is *set*: true for a boolean-typed column, else has a value."""
    s = df[col]
    if types.get(col) == "boolean":
        return (s == truth[col]).fillna(False).astype(bool)
    return s.notna()


def member(df: pd.DataFrame, col: str, values: tuple | None) -> pd.Series:
    s = df[col]
    if values is None:
        return s.notna()
    return s.isin(list(values)).fillna(False).astype(bool)


def violations(df: pd.DataFrame, rules: list[Rule], types: dict[str, str], truth: dict[str, Any]
               ) -> dict[Rule, pd.Series]:
    """Rule -> the rows of ``df`` that break it."""
    out = {}
    for r in rules:
        a = active(df, r.column, types, truth)
        if r.type == "only_when":
            out[r] = a & ~member(df, r.other, r.values)
        elif r.type == "required_when":
            out[r] = member(df, r.other, r.values) & ~a
        else:
            out[r] = a & active(df, r.other, types, truth)
    return out


def _key(r: Rule) -> tuple:
    """Normal form (antecedent => consequent) so the same implication found twice is kept once."""
    if r.type == "exclusive":
        return ("x", *sorted((r.column, r.other)))
    col = ("act", r.column)
    oth = ("in", r.other, r.values)
    return ("i", col, oth) if r.type == "only_when" else ("i", oth, col)


def detect_rules(df: pd.DataFrame, types: dict[str, str], truth: dict[str, Any], *, min_support: int = 10,
                 min_expected: float = 10.0, max_levels: int = 10, max_rules: int = 40) -> list[Rule]:
    """The logic rules the real table ``df`` keeps without exception, with evidence (module docstring)."""
    n = len(df)
    cols = [c for c in df.columns if types.get(c) not in (None, "identifier", "exclude")]
    act = {c: active(df, c, types, truth) for c in cols}
    # "set" is informative only for columns set in some rows and not others
    settable = [c for c in cols if min_support <= int(act[c].sum()) <= n - min_support]
    # conditions: a category-typed column taking one of a subset of its values, or any column having a value
    conditions: list[tuple[str, tuple | None, pd.Series]] = []
    for c in cols:
        s = df[c]
        present = s.notna()
        if min_support <= int(present.sum()) <= n - min_support:
            conditions.append((c, None, present))
        if types.get(c) in CATEGORY_TYPES and 2 <= s.nunique() <= max_levels:
            conditions.append((c, "levels", present))
    found: dict[tuple, Rule] = {}

    def add(rule: Rule, expected: float) -> None:
        k = _key(rule)
        if expected >= min_expected and k not in found:
            found[k] = rule

    for x in settable:
        ax = act[x]
        nx = int(ax.sum())
        for c, how, present in conditions:
            if c == x:
                continue
            s = df[c]
            if how is None:  # X set only when / whenever C has a value
                nc = int(present.sum())
                if not (ax & ~present).any():
                    add(Rule("only_when", x, c, None, support=nx), nx * (n - nc) / n)
                if not (present & ~ax).any():
                    add(Rule("required_when", x, c, None, support=nc), nc * (n - nx) / n)
                continue
            if s[ax].isna().any():
                continue
            inside = tuple(sorted((_py(v) for v in pd.unique(s[ax].dropna())), key=str))
            levels = pd.unique(s.dropna())
            if 0 < len(inside) < len(levels):
                m = s.isin(list(inside))
                outside = int((present & ~m).sum())
                if outside >= min_support:
                    add(Rule("only_when", x, c, inside, support=nx), nx * outside / n)
            # X set whenever C is in a set: the levels where X is always set
            always = tuple(sorted((_py(v) for v in levels if bool(ax[s == v].all())), key=str))
            if 0 < len(always) < len(levels):
                m = s.isin(list(always))
                nm = int(m.sum())
                if nm >= min_support and (~ax).sum() >= min_support:
                    add(Rule("required_when", x, c, always, support=nm), nm * int((~ax).sum()) / n)
    flags = [c for c in settable if types.get(c) == "boolean"]
    for i, a in enumerate(flags):
        for b in flags[i + 1:]:
            if not (act[a] & act[b]).any():
                add(Rule("exclusive", a, b), int(act[a].sum()) * int(act[b].sum()) / n)
    rules = sorted(found.values(), key=lambda r: -r.support)
    if len(rules) > max_rules:
        log.info("table: %d logic rules detected, the %d best supported kept", len(rules), max_rules)
        rules = rules[:max_rules]
    return rules


def spec_rules(spec_rules: list[Any], df: pd.DataFrame, types: dict[str, str], truth: dict[str, Any]
               ) -> list[Rule]:
    """The spec's ``source.rules``; refused when a column is unknown or the real table breaks one."""
    out = []
    for i, r in enumerate(spec_rules):
        for c in (r.column, r.other):
            if c not in df.columns:
                raise RuleError(f"source.rules[{i}]: {c!r} is not a modelled column of the table")
        rule = Rule(r.type, r.column, r.other, None if r.values is None else tuple(_py(v) for v in r.values),
                    source="spec")
        bad = int(violations(df, [rule], types, truth)[rule].sum())
        if bad:
            raise RuleError(f"source.rules[{i}] ({rule.describe()}) is broken by {bad} real row(s)")
        out.append(rule)
    return out


def prepare_table(table: pd.DataFrame, columns: dict, spec: Any, key: str) -> tuple[pd.DataFrame, dict]:
    """The modelling table (the ingested one: ``key`` + the input's modelled columns) and the table plan."""
    types = {c: t for c, t in columns["types"].items() if c in table.columns}
    df = table.drop(columns=[key])
    truth = {c: true_value(df[c]) for c, t in types.items() if t == "boolean"}
    rules = spec_rules(list(spec.source.rules), df, types, truth)
    if spec.source.detect_rules:
        have = {_key(r) for r in rules}
        rules += [r for r in detect_rules(df, types, truth) if _key(r) not in have]
    values = {c: sorted((_py(v) for v in pd.unique(df[c].dropna())), key=lambda v: (str(type(v)), v))
              for c, t in types.items() if t in CATEGORY_TYPES}
    plan = {"columns": list(df.columns), "types": types, "dtypes": {c: str(df[c].dtype) for c in df.columns},
            "truth": truth,
            "values": values, "rules": [r.to_dict() for r in rules], "dropped": columns.get("dropped", [])}
    if rules:
        log.info("table: %d logic rule(s): %s", len(rules), "; ".join(r.describe() for r in rules[:10]))
    return table, plan


def metadata_overrides(plan: dict) -> dict[str, dict]:
    """SDV column metadata of the typed columns: category types are categorical whatever their dtype."""
    return {c: {"sdtype": "categorical"} for c, t in plan["types"].items() if t in CATEGORY_TYPES}


def conform(df: pd.DataFrame, plan: dict) -> pd.DataFrame:
    """A synthetic batch in the real table's dtypes and column order."""
    out = {}
    for col in plan.get("columns") or list(plan["dtypes"]):  # the real order (JSON may sort the dtypes' keys)
        dtype = plan["dtypes"][col]
        s = df[col]
        try:
            if dtype.startswith(("int", "uint")) and s.isna().any():
                s = pd.to_numeric(s, errors="coerce").astype("float64")
            elif dtype.startswith("datetime64"):
                s = pd.to_datetime(s, errors="coerce").astype(dtype)
            elif dtype == "bool":
                s = s.astype(bool)
            elif dtype != "object":
                s = s.astype(dtype)
            else:
                s = s.astype(object).where(s.notna(), None)
        except (TypeError, ValueError):
            pass
        out[col] = s
    return pd.DataFrame(out, index=df.index)


def rules_of(plan: dict) -> list[Rule]:
    return [Rule.from_dict(d) for d in plan.get("rules", [])]


def rule_sampler(base: Callable[[Any, int], pd.DataFrame], plan: dict, counts: dict[str, int],
                 max_rounds: int = 50) -> Callable[[Any, int], pd.DataFrame]:
    """Wrap ``sampler(synth, n)`` so every returned row keeps the plan's rules (the others are redrawn) and is
    in the real table's dtypes; ``counts`` gets the redrawn rows per rule."""
    rules = rules_of(plan)
    types, truth = plan["types"], plan.get("truth", {})

    def sampler(synth: Any, n: int) -> pd.DataFrame:
        kept: list[pd.DataFrame] = []
        have = 0
        for _ in range(max_rounds):
            want = n - have
            df = conform(base(synth, max(want, int(want * 1.25) + 8)).reset_index(drop=True), plan)
            if rules:
                bad = pd.Series(False, index=df.index)
                for r, mask in violations(df, rules, types, truth).items():
                    if mask.any():
                        key = f"rule: {r.describe()}"
                        counts[key] = counts.get(key, 0) + int(mask.sum())
                    bad |= mask
                df = df[~bad.to_numpy()]
            df = df.iloc[:want]
            kept.append(df)
            have += len(df)
            if have >= n:
                break
        if have < n:
            raise RuleError(f"the table's logic rules reject almost every sampled row ({have} of {n} kept after "
                            f"{max_rounds} rounds); set source.detect_rules: false or fewer source.rules")
        return pd.concat(kept, ignore_index=True).iloc[:n]

    return sampler
