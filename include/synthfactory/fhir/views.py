"""Declarative flattening: SQL-on-FHIR v2 ViewDefinitions, compiled once into Python closures.

A ViewDefinition (JSON/YAML, as a dict) gives one output table::

    {"resourceType": "ViewDefinition", "name": "medication_request", "resource": "MedicationRequest",
     "constant": [{"name": "rx", "valueString": "http://www.nlm.nih.gov/research/umls/rxnorm"}],
     "where": [{"path": "status != 'entered-in-error'"}],
     "select": [{"column": [{"name": "medication_request_key", "path": "getResourceKey()"},
                            {"name": "authored_on", "path": "authoredOn", "type": "dateTime"}]},
                {"forEach": "dosageInstruction", "column": [...]},
                {"unionAll": [{...}, {...}]}]}

Supported: all of SQL-on-FHIR v2 (the official suite passes, tests/ingest/test_sof_conformance.py): ``select``
(nested), ``column`` (``name``, ``path``, ``type``, ``collection``: an empty collection is ``[]``), ``forEach``,
``forEachOrNull``, ``repeat`` (depth first), ``unionAll``, view-level ``where`` (a path that gives something
other than a boolean refuses the resource: :class:`BadResource`) and ``constant`` (an undefined ``%name`` is
refused at compile time), and the FHIRPath of :mod:`synthfactory.fhir.fhirpath` (``%rowIndex`` is the position
of the current ``forEach``/``repeat`` item, 0 on a ``forEachOrNull`` row of nulls).

Column ``type`` decides the Arrow type: ``string``/``code``/``id``/``uri``/... -> string, ``boolean``,
``integer`` (int64), ``decimal`` (float64), ``date`` (date32: the calendar date of a date or dateTime),
``dateTime``/``instant`` (timestamp[us, UTC]). A value that does not fit its column's type quarantines the
resource (reason ``invalid value in <column>`` / ``invalid date in <column>``), as the built-in flatteners do.

Built-in views (:data:`BUILTIN_VIEWS`) exist for ``patient``, ``encounter``, ``condition``, ``observation``
(the same rows as the hand-written fast path in :mod:`synthfactory.ingest.flatteners`; a test proves it
on generated data), ``medication_request`` and ``procedure``.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import pyarrow as pa

from .fhirpath import Env, FhirPathError, compile_path
from .normalize import BadResource, fhir_datetime_deferred, local_days, timestamp_array
from synthfactory.errors import ConfigError

__all__ = ["ViewError", "CompiledView", "compile_view", "BUILTIN_VIEWS", "builtin_view", "load_view_file",
           "TABLE_NAME_RE"]

TABLE_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
COLUMN_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}$")
TS = pa.timestamp("us", tz="UTC")


class ViewError(ConfigError, ValueError):
    """An invalid ViewDefinition. The message names the element (e.g. ``select[1].column[0].path``)."""


# --------------------------------------------------------------------------------------------------
# Column types
# --------------------------------------------------------------------------------------------------
_STRING_TYPES = {"string", "code", "id", "uri", "url", "canonical", "markdown", "oid", "uuid", "time",
                 "base64Binary", "xhtml"}
_INT_TYPES = {"integer", "positiveInt", "unsignedInt", "integer64"}


def _arrow_type(t: str | None) -> pa.DataType:
    if t is None or t in _STRING_TYPES:
        return pa.string()
    if t == "boolean":
        return pa.bool_()
    if t in _INT_TYPES:
        return pa.int64()
    if t == "decimal":
        return pa.float64()
    if t == "date":
        return pa.date32()
    if t in ("dateTime", "instant"):
        return TS
    raise ViewError(f"unsupported column type {t!r}")


def _exactly(kind: type, bad_value: str) -> Callable[[Any], Any]:
    """A converter that takes values of exactly ``kind`` (``bool`` is no ``int``) as they are."""
    def exact(v: Any) -> Any:
        if type(v) is kind:
            return v
        raise BadResource(bad_value)
    return exact


def _parsed(parse: Callable[[Any], Any], bad_date: str) -> Callable[[Any], Any]:
    """A converter through a FHIR date parser; a value it refuses is ``bad_date``."""
    def convert(v: Any) -> Any:
        try:
            return parse(v)
        except (ValueError, TypeError, OverflowError):
            raise BadResource(bad_date) from None
    return convert


def _converter(t: str | None, col: str) -> Callable[[Any], Any]:
    """value -> Arrow-ready Python value; raises BadResource when it does not fit."""
    bad_value = f"invalid value in {col}"
    bad_date = f"invalid date in {col}"
    if t is None:
        def untyped(v: Any) -> Any:
            tv = type(v)
            if tv is str:
                return v
            if tv is bool:
                return "true" if v else "false"
            if tv is int or tv is float:
                return str(v)
            raise BadResource(bad_value)
        return untyped
    if t in _STRING_TYPES:
        return _exactly(str, bad_value)
    if t == "boolean":
        return _exactly(bool, bad_value)
    if t in _INT_TYPES:
        return _exactly(int, bad_value)
    if t == "decimal":
        def decimal(v: Any) -> Any:
            tv = type(v)
            if tv is float:
                return v
            if tv is int:
                return float(v)
            raise BadResource(bad_value)
        return decimal
    if t == "date":
        return _parsed(local_days, bad_date)
    if t in ("dateTime", "instant"):
        return _parsed(fhir_datetime_deferred, bad_date)
    raise ViewError(f"unsupported column type {t!r}")


# --------------------------------------------------------------------------------------------------
# Compiled form
# --------------------------------------------------------------------------------------------------
RowsFn = Callable[[Any, Env], list]


@dataclass
class CompiledView:
    """A ViewDefinition compiled to ``rows(resource, env) -> [tuple, ...]`` (values in ``schema`` order)."""

    name: str
    resource: str
    schema: pa.Schema
    rows: Callable[[dict, Env], list]
    constants: dict[str, Any] = field(default_factory=dict)
    definition: dict = field(default_factory=dict)

    @property
    def columns(self) -> list[str]:
        return self.schema.names

    def table(self, rows: list) -> pa.Table:
        """An Arrow table (this view's schema) of rows as :attr:`rows` returns them, built as ingest builds its
        Parquet batches (dateTime columns through :func:`timestamp_array`)."""
        cols = list(zip(*rows)) if rows else [()] * len(self.schema)
        arrays = [timestamp_array(list(c), f.type) if pa.types.is_timestamp(f.type) else pa.array(list(c), f.type)
                  for c, f in zip(cols, self.schema)]
        return pa.Table.from_arrays(arrays, schema=self.schema)


@dataclass
class _Select:
    names: list[str]
    types: list[pa.DataType]
    fn: RowsFn  # (node, env) -> list of tuples over ``names``


def _j(where: str, child: str) -> str:
    return f"{where}.{child}" if where else child


def _err(where: str, msg: str) -> ViewError:
    return ViewError(f"{where}: {msg}" if where else msg)


def _path(expr: Any, where: str, constants: Any = None) -> Callable[[list, Env], list]:
    if not isinstance(expr, str) or not expr.strip():
        raise _err(where, "must be a non-empty FHIRPath string")
    try:
        return compile_path(expr, constants=constants)
    except FhirPathError as exc:
        raise _err(where, str(exc)) from None


def _compile_column(col: Any, where: str, constants: Any = None
                    ) -> tuple[str, pa.DataType, Callable[[list, Env], Any], bool]:
    if not isinstance(col, dict):
        raise _err(where, "must be an object with name and path")
    unknown = set(col) - {"name", "path", "type", "collection", "description", "tag", "tags"}
    if unknown:
        raise _err(where, f"unknown field(s) {sorted(unknown)}")
    name = col.get("name")
    if not isinstance(name, str) or not COLUMN_NAME_RE.match(name):
        raise _err(_j(where, "name"), "must be a database-friendly name (letters, digits, _; starting with a letter)")
    fn = _path(col.get("path"), _j(where, "path"), constants)
    row_index = isinstance(col.get("path"), str) and col["path"].strip() == "%rowIndex"
    t = col.get("type")
    if t is not None and not isinstance(t, str):
        raise _err(_j(where, "type"), "must be a FHIR type name")
    try:
        atype = _arrow_type(t)
        conv = _converter(t, name)
    except ViewError as exc:
        raise _err(_j(where, "type"), str(exc)) from None
    collection = col.get("collection", False)
    if not isinstance(collection, bool):
        raise _err(_j(where, "collection"), "must be true or false")
    too_many = f"more than one value in {name}"

    if collection:  # an empty collection is [] (not null), as the spec's tests require
        atype = pa.list_(atype)

        def value_list(focus: list, env: Env) -> Any:
            return [conv(v) for v in fn(focus, env)]
        return name, atype, value_list, row_index

    def value(focus: list, env: Env) -> Any:
        vals = fn(focus, env)
        if not vals:
            return None
        if len(vals) > 1:
            raise BadResource(too_many)
        return conv(vals[0])
    return name, atype, value, row_index


def _list_of(sel: dict, key: str, where: str) -> list:
    v = sel.get(key)
    if v is None:
        return []
    if not isinstance(v, list):
        raise _err(_j(where, key), "must be a list")
    return v


def _repeat_fn(paths: list[Callable[[list, Env], list]]) -> Callable[[list, Env], list]:
    """``repeat``: the nodes reached by applying the paths again and again (depth first, each node before its
    descendants, the paths in their order), the starting node excluded."""
    def children(node: Any, env: Env) -> list:
        env.this = node
        out: list = []
        for p in paths:
            out.extend(p([node], env))
        return out

    def repeat(focus: list, env: Env) -> list:
        out: list = []
        saved = env.this
        try:
            stack = [iter([c for node in focus for c in children(node, env)])]
            while stack:
                node = next(stack[-1], _DONE)
                if node is _DONE:
                    stack.pop()
                    continue
                out.append(node)
                if len(out) > _REPEAT_MAX:
                    raise BadResource(f"repeat reaches more than {_REPEAT_MAX} nodes")
                ch = children(node, env)
                if ch:
                    stack.append(iter(ch))
        finally:
            env.this = saved
        return out
    return repeat


_DONE = object()
_REPEAT_MAX = 1_000_000


def _compile_select(sel: Any, where: str, constants: Any = None) -> _Select:
    if not isinstance(sel, dict):
        raise _err(where, "must be an object")
    unknown = set(sel) - {"column", "select", "forEach", "forEachOrNull", "repeat", "unionAll", "description"}
    if unknown:
        raise _err(where, f"unknown field(s) {sorted(unknown)}")
    if sum(k in sel for k in ("forEach", "forEachOrNull", "repeat")) > 1:
        raise _err(where, "forEach, forEachOrNull and repeat are exclusive")
    or_null = "forEachOrNull" in sel
    each_fn = None
    if "repeat" in sel:
        rep = sel["repeat"]
        if not isinstance(rep, list) or not rep:
            raise _err(_j(where, "repeat"), "must be a non-empty list of FHIRPath strings")
        each_fn = _repeat_fn([_path(x, _j(where, f"repeat[{i}]"), constants) for i, x in enumerate(rep)])
    elif "forEach" in sel or or_null:
        key = "forEachOrNull" if or_null else "forEach"
        each_fn = _path(sel[key], _j(where, key), constants)
    cols = [_compile_column(c, _j(where, f"column[{i}]"), constants)
            for i, c in enumerate(_list_of(sel, "column", where))]
    subs = [_compile_select(s, _j(where, f"select[{i}]"), constants)
            for i, s in enumerate(_list_of(sel, "select", where))]
    union = None
    if _list_of(sel, "unionAll", where):
        branches = [_compile_select(s, _j(where, f"unionAll[{i}]"), constants)
                    for i, s in enumerate(sel["unionAll"])]
        first = branches[0].names
        for i, b in enumerate(branches[1:], 1):
            if b.names != first:
                raise _err(_j(where, f"unionAll[{i}]"), f"columns {b.names} differ from unionAll[0]'s {first}")
        union = branches
    names = [c[0] for c in cols] + [n for s in subs for n in s.names] + (union[0].names if union else [])
    types = [c[1] for c in cols] + [t for s in subs for t in s.types] + (union[0].types if union else [])
    if not names:
        raise _err(where, "selects no column")
    col_fns = tuple(c[2] for c in cols)
    sub_fns = tuple(s.fn for s in subs)
    union_fns = tuple(b.fn for b in union) if union else None
    # forEachOrNull without items: one row of nulls, but %rowIndex is 0 there as on any first row
    null_row = tuple(0 if c[3] else None for c in cols) + (None,) * (len(names) - len(cols))

    def one(node: Any, env: Env) -> list:
        focus = [node]
        env.this = node
        rows = [tuple(f(focus, env) for f in col_fns)]
        for sf in sub_fns:
            sub_rows = sf(node, env)
            rows = [r + s for r in rows for s in sub_rows]
            if not rows:
                return rows
        if union_fns is not None:
            u: list = []
            for uf in union_fns:
                u.extend(uf(node, env))
            rows = [r + s for r in rows for s in u]
        return rows

    if each_fn is None:
        if not sub_fns and union_fns is None:
            def simple(node: Any, env: Env) -> list:
                focus = [node]
                env.this = node
                return [tuple(f(focus, env) for f in col_fns)]
            return _Select(names, types, simple)
        return _Select(names, types, one)

    def each_rows(node: Any, env: Env) -> list:
        env.this = node
        items = each_fn([node], env)
        if not items:
            return [null_row] if or_null else []
        saved = env.row_index
        out: list = []
        try:
            for i, it in enumerate(items):
                env.row_index = i
                out.extend(one(it, env))
        finally:
            env.row_index = saved
        return out
    return _Select(names, types, each_rows)


def _constant_value(c: Any, where: str) -> tuple[str, Any]:
    if not isinstance(c, dict) or not isinstance(c.get("name"), str):
        raise _err(where, "a constant needs a name and a value[x]")
    vals = [(k, v) for k, v in c.items() if k.startswith("value")]
    if len(vals) != 1:
        raise _err(where, "a constant needs exactly one value[x]")
    return c["name"], vals[0][1]


def compile_view(definition: dict, *, schema: pa.Schema | None = None, where: str = "",
                 require_name: bool = True) -> CompiledView:
    """Compile a ViewDefinition. ``schema`` (optional) fixes the output column order and types (the
    built-in tables use their established schemas). ``require_name=False`` accepts a view without a ``name``
    (named ``view``; ingest needs the name for its table). Raises :class:`ViewError` naming the bad element."""
    if not isinstance(definition, dict):
        raise _err(where, "a ViewDefinition must be an object")
    p = f"{where}." if where else ""
    unknown = set(definition) - {"resourceType", "name", "resource", "select", "where", "constant", "status",
                                 "title", "description", "url", "id", "meta", "fhirVersion", "publisher",
                                 "experimental", "identifier", "contact", "copyright", "useContext"}
    if unknown:
        raise _err(where, f"unknown field(s) {sorted(unknown)}")
    if definition.get("resourceType", "ViewDefinition") != "ViewDefinition":
        raise _err(f"{p}resourceType", "must be ViewDefinition")
    name = definition.get("name")
    if name is None and not require_name:
        name = "view"
    if not isinstance(name, str) or not TABLE_NAME_RE.match(name):
        raise _err(f"{p}name", "must be a lower_snake_case table name (letters, digits, _), 1-63 chars")
    resource = definition.get("resource")
    if not isinstance(resource, str) or not re.match(r"^[A-Z][A-Za-z]+$", resource):
        raise _err(f"{p}resource", "must be a FHIR resource type, e.g. MedicationRequest")
    constant_list = definition.get("constant") or []
    if not isinstance(constant_list, list):
        raise _err(f"{p}constant", "must be a list")
    constants = dict(_constant_value(c, f"{p}constant[{i}]") for i, c in enumerate(constant_list))
    selects = definition.get("select")
    if not isinstance(selects, list) or not selects:
        raise _err(f"{p}select", "must be a non-empty list")
    if len(selects) == 1:
        top = _compile_select(selects[0], f"{p}select[0]", constants)
    else:
        top = _compile_select({"select": selects}, p.rstrip("."), constants)
    names, types = top.names, top.types
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise _err(f"{p}select", f"duplicate column name(s) {dupes}")
    wheres = []
    for i, w in enumerate(definition.get("where") or []):
        if not isinstance(w, dict):
            raise _err(f"{p}where[{i}]", "must be an object with a path")
        wheres.append((_path(w.get("path"), f"{p}where[{i}].path", constants),
                       f"where[{i}].path gives a value that is not a boolean"))

    if schema is not None:
        missing = [f.name for f in schema if f.name not in names]
        extra = [n for n in names if n not in schema.names]
        if missing or extra:
            raise _err(f"{p}select", f"columns must be exactly {schema.names} (missing {missing}, extra {extra})")
        out_schema = schema
    else:
        out_schema = pa.schema([pa.field(n, t) for n, t in zip(names, types)])
    perm = [names.index(f.name) for f in out_schema]
    reorder = None if perm == list(range(len(names))) else operator.itemgetter(*perm)
    if reorder is not None and len(perm) == 1:
        reorder = (lambda r, _g=reorder: (_g(r),))
    top_fn = top.fn
    wheres_t = tuple(wheres)

    def rows(resource: dict, env: Env) -> list:
        env.resource = resource
        env.row_index = 0
        env.constants = constants
        if wheres_t:
            focus = [resource]
            for w, not_boolean in wheres_t:
                env.this = resource
                r = w(focus, env)
                if not r:
                    return []
                if len(r) != 1 or type(r[0]) is not bool:
                    raise BadResource(not_boolean)
                if r[0] is False:
                    return []
        out = top_fn(resource, env)
        if reorder is not None:
            return [reorder(r) for r in out]
        return out

    return CompiledView(name=name, resource=resource, schema=out_schema, rows=rows, constants=constants,
                        definition=definition)


def load_view_file(path: str) -> dict:
    """Read a ViewDefinition from a .json or .yaml/.yml file."""
    with open(path, "rb") as fh:
        data = fh.read()
    if path.endswith(".json"):
        import orjson

        return orjson.loads(data)
    import yaml

    return yaml.safe_load(data)


#: elements of a resource that hold free text or direct identifiers: a user view's column may select them only
#: when the spec allow-lists the column (``source.text_columns``); element name -> what it is
FREE_TEXT_ELEMENTS = {
    "note": "free text (Annotation)", "text": "free text (narrative or CodeableConcept.text)",
    "div": "free text (narrative)", "valueString": "free text (valueString)", "comment": "free text",
    "patientInstruction": "free text", "description": "free text", "valueMarkdown": "free text",
    "name": "a direct identifier (name)", "address": "a direct identifier (address)",
    "telecom": "a direct identifier (telecom)", "identifier": "a direct identifier (identifier)",
    "photo": "a direct identifier (photo)",
}
_STRING_LITERAL = re.compile(r"'(?:[^'\\]|\\.)*'|`(?:[^`\\]|\\.)*`")
_IDENT = re.compile(r"(?<![A-Za-z0-9_%$])([A-Za-z_][A-Za-z0-9_]*)")
_OFTYPE_STRING = re.compile(r"\bvalue\s*\.\s*ofType\s*\(\s*(?:FHIR\.)?(string|markdown)\s*\)")


#: coded parts of an identifying element: ``address.state`` (the built-in patient table's) is not an address line
_CODED_PARTS = {"address": {"state", "country", "use", "type", "period", "district"},
                "name": {"use", "period"}, "telecom": {"system", "use", "rank", "period"},
                "identifier": {"system", "use", "type", "period", "assigner"}}


def _free_text_in(path: str) -> str | None:
    """What free text or identifier a FHIRPath expression selects (by element name, outside string literals),
    or None. Conservative: a path naming ``note`` anywhere counts, also inside a ``where``; an identifying
    element counts unless the next element at its level is a coded part (``address.state``)."""
    bare = _STRING_LITERAL.sub("''", path)
    m = _OFTYPE_STRING.search(bare)
    if m:
        return f"free text (value[x] of type {m.group(1)})"
    depth = [0] * (len(bare) + 1)
    d = 0
    for i, ch in enumerate(bare):
        if ch in "([":
            d += 1
        elif ch in ")]":
            d -= 1
        depth[i + 1] = d
    tokens = [(m.group(1), m.start(), depth[m.start()]) for m in _IDENT.finditer(bare)
              if bare[m.end():m.end() + 1] != "("]  # a function (e.g. getResourceKey(), where()) is no element
    for j, (name, _, lvl) in enumerate(tokens):
        what = FREE_TEXT_ELEMENTS.get(name)
        if what is None:
            continue
        parts = _CODED_PARTS.get(name)
        if parts is not None:
            nxt = next((t for t, _, lv in tokens[j + 1:] if lv == lvl), None)
            if nxt in parts:
                continue
        return what
    return None


def free_text_columns(definition: dict) -> list[tuple[str, str, str]]:
    """``[(column name, path, what)]``: the columns of a ViewDefinition whose value comes from free text or a
    direct identifier (:data:`FREE_TEXT_ELEMENTS`, ``value.ofType(string)``), through the column's own path
    or an enclosing ``forEach``/``forEachOrNull``. Ingest refuses a user view with such a column unless the
    spec allow-lists it in ``source.text_columns``."""
    out: list[tuple[str, str, str]] = []

    def walk(sel: Any, outer: list[str]) -> None:
        if not isinstance(sel, dict):
            return
        scope = list(outer)
        for k in ("forEach", "forEachOrNull"):
            if isinstance(sel.get(k), str):
                scope.append(sel[k])
        rep = sel.get("repeat")
        if isinstance(rep, list):
            scope.extend(p for p in rep if isinstance(p, str))
        for col in sel.get("column") or ():
            if not isinstance(col, dict) or not isinstance(col.get("path"), str):
                continue
            for p in (*scope, col["path"]):
                what = _free_text_in(p)
                if what is not None:
                    out.append((str(col.get("name")), p, what))
                    break
        for sub in (*(sel.get("select") or ()), *(sel.get("unionAll") or ())):
            walk(sub, scope)

    for top in definition.get("select") or ():
        walk(top, [])
    return out


def check_free_text(definition: dict, allowed: Any = (), where: str = "") -> None:
    """Raise :class:`ViewError` when a column of ``definition`` selects free text or a direct identifier and
    ``table.column`` is not in ``allowed`` (the spec's ``source.text_columns``)."""
    name = definition.get("name")
    allowed = set(allowed or ())
    bad = [(c, p, w) for c, p, w in free_text_columns(definition) if f"{name}.{c}" not in allowed]
    if bad:
        c, p, w = bad[0]
        more = f" (and {len(bad) - 1} more column(s))" if len(bad) > 1 else ""
        raise _err(where or f"views[{name}]",
                   f"column {c!r} selects {w} through {p!r}{more}: free text and direct identifiers never reach "
                   f"a table; allow-list the column in source.text_columns ('{name}.{c}') only if its strings are "
                   f"coded values")


# --------------------------------------------------------------------------------------------------
# Built-in views
# --------------------------------------------------------------------------------------------------
def _c(name: str, path: str, type_: str | None = None) -> dict:
    col = {"name": name, "path": path}
    if type_:
        col["type"] = type_
    return col


# a CodeableConcept's text is free text: never a fallback in a built-in table (the fast path keeps it only for the
# codes a spec allow-lists in source.text_codes)
_FIRST_CODE = "coding.first().code"
_DISPLAY = "preferredCoding().display"
US_CORE = "http://hl7.org/fhir/us/core/StructureDefinition/"
_HAS_VALUE = (
    "value.ofType(Quantity).value.exists() or value.ofType(CodeableConcept).select(" + _FIRST_CODE + ").exists()"
    " or value.ofType(boolean).exists() or value.ofType(integer).exists()"
)
_VALUE_COLUMNS = [
    _c("code_system", "code.preferredCoding().system.systemAlias()", "string"),
    _c("code", "code.preferredCoding().code", "string"),
    _c("display", f"code.select({_DISPLAY})", "string"),
    _c("value_num", "iif(value.ofType(Quantity).exists(), value.ofType(Quantity).value, value.ofType(integer))",
       "decimal"),
    _c("unit", "value.ofType(Quantity).where(value.exists()).select(iif(unit.exists(), unit, code))", "string"),
    # a valueString is free text: never in the table (the fast path keeps allow-listed codes' strings)
    _c("value_code", "iif(value.ofType(Quantity).exists(), {}, iif(value.ofType(CodeableConcept).exists(), "
                     f"value.ofType(CodeableConcept).select({_FIRST_CODE}), "
                     "value.ofType(boolean).toString()))", "string"),
]

BUILTIN_VIEWS: dict[str, dict] = {
    "patient": {
        "resourceType": "ViewDefinition", "name": "patient", "resource": "Patient",
        "select": [{"column": [
            _c("patient_key", "getResourceKey()", "string"),
            _c("gender", "gender", "code"),
            _c("birth_date", "birthDate", "date"),
            _c("birth_date_precision", "birthDate.datePrecision()", "string"),
            _c("deceased", "deceased.ofType(dateTime).exists() or (deceased.ofType(boolean).exists() "
                           "and deceased.ofType(boolean))", "boolean"),
            _c("deceased_date", "deceased.ofType(dateTime)", "date"),
            _c("race", f"extension('{US_CORE}us-core-race').extension('ombCategory').first()"
                       ".value.ofType(Coding).select(iif(display.exists(), display, code))", "string"),
            _c("ethnicity", f"extension('{US_CORE}us-core-ethnicity').extension('ombCategory').first()"
                            ".value.ofType(Coding).select(iif(display.exists(), display, code))", "string"),
            _c("birth_sex", f"extension('{US_CORE}us-core-birthsex').last().value.ofType(code)", "code"),
            _c("marital_status", f"maritalStatus.select({_FIRST_CODE})", "string"),
            _c("state", "address.first().state", "string"),
        ]}],
    },
    "encounter": {
        "resourceType": "ViewDefinition", "name": "encounter", "resource": "Encounter",
        "select": [{"column": [
            _c("encounter_key", "getResourceKey()", "string"),
            _c("patient_key", "subject.getReferenceKey(Patient)", "string"),
            _c("status", "status", "code"),
            # R4: class is a Coding; R5: a list of CodeableConcept
            _c("class_code", "class.first().select(iif(coding.exists(), coding.first().code, code))", "string"),
            _c("type_code", "type.first().coding.first().code", "string"),
            _c("type_display", "type.first().coding.first().display", "string"),
            _c("start", "iif(period.exists(), period, actualPeriod).start", "dateTime"),
            _c("end", "iif(period.exists(), period, actualPeriod).end", "dateTime"),
        ]}],
    },
    "condition": {
        "resourceType": "ViewDefinition", "name": "condition", "resource": "Condition",
        "select": [{"column": [
            _c("condition_key", "getResourceKey()", "string"),
            _c("patient_key", "subject.getReferenceKey(Patient)", "string"),
            _c("encounter_key", "iif(encounter.exists(), encounter, context).getReferenceKey(Encounter)", "string"),
            _c("code_system", "code.preferredCoding().system.systemAlias()", "string"),
            _c("code", "code.preferredCoding().code", "string"),
            _c("display", f"code.select({_DISPLAY})", "string"),
            _c("clinical_status", f"clinicalStatus.select({_FIRST_CODE})", "string"),
            _c("onset", "iif(onset.ofType(dateTime).exists(), onset.ofType(dateTime), onset.ofType(Period).start)",
               "dateTime"),
        ]}],
    },
    "observation": {
        "resourceType": "ViewDefinition", "name": "observation", "resource": "Observation",
        "select": [
            {"column": [
                _c("patient_key", "subject.getReferenceKey(Patient)", "string"),
                _c("encounter_key", "iif(encounter.exists(), encounter, context).getReferenceKey(Encounter)",
                   "string"),
                _c("category", f"category.first().select({_FIRST_CODE})", "string"),
                _c("effective", "iif(effective.ofType(dateTime).exists(), effective.ofType(dateTime), "
                                "iif(effective.ofType(Period).start.exists(), effective.ofType(Period).start, "
                                "effective.ofType(instant)))", "dateTime"),
            ]},
            {"unionAll": [
                # one row per component that has a value (blood pressure), keyed Observation/<id>#<index>
                {"forEach": "component",
                 "column": [_c("observation_key", "%resource.getResourceKey('#' + %rowIndex.toString())",
                               "string")],
                 "select": [{"forEach": f"where({_HAS_VALUE})", "column": _VALUE_COLUMNS}]},
                # the observation's own row: when it has a value, or has no components at all
                {"forEach": f"where({_HAS_VALUE} or component.empty())",
                 "column": [_c("observation_key", "getResourceKey()", "string"), *_VALUE_COLUMNS]},
            ]},
        ],
    },
    "medication_request": {
        "resourceType": "ViewDefinition", "name": "medication_request", "resource": "MedicationRequest",
        "select": [{"column": [
            _c("medication_request_key", "getResourceKey()", "string"),
            _c("patient_key", "subject.getReferenceKey(Patient)", "string"),
            _c("encounter_key", "encounter.getReferenceKey(Encounter)", "string"),
            _c("status", "status", "code"),
            _c("intent", "intent", "code"),
            _c("category", f"category.first().select({_FIRST_CODE})", "string"),
            # medication[x]: a CodeableConcept, or a Reference (contained #id resolved to its code)
            _c("code_system", "iif(medication.ofType(CodeableConcept).exists(), medication.ofType(CodeableConcept), "
                              "medication.ofType(Reference).resolve().code).preferredCoding().system.systemAlias()",
               "string"),
            _c("code", "iif(medication.ofType(CodeableConcept).exists(), medication.ofType(CodeableConcept), "
                       "medication.ofType(Reference).resolve().code).preferredCoding().code", "string"),
            _c("display", "iif(medication.ofType(CodeableConcept).exists(), medication.ofType(CodeableConcept), "
                          f"medication.ofType(Reference).resolve().code).select({_DISPLAY})", "string"),
            _c("medication_key", "medication.ofType(Reference).getReferenceKey(Medication)", "string"),
            _c("authored_on", "authoredOn", "dateTime"),
            _c("authored_on_precision", "authoredOn.datePrecision()", "string"),
            _c("dose_value", "dosageInstruction.first().doseAndRate.first().dose.ofType(Quantity).value", "decimal"),
            _c("dose_unit", "dosageInstruction.first().doseAndRate.first().dose.ofType(Quantity)"
                            ".select(iif(system = %ucum and code.exists(), code, unit))", "string"),
        ]}],
    },
    "procedure": {
        "resourceType": "ViewDefinition", "name": "procedure", "resource": "Procedure",
        "select": [{"column": [
            _c("procedure_key", "getResourceKey()", "string"),
            _c("patient_key", "subject.getReferenceKey(Patient)", "string"),
            _c("encounter_key", "encounter.getReferenceKey(Encounter)", "string"),
            _c("status", "status", "code"),
            _c("code_system", "code.preferredCoding().system.systemAlias()", "string"),
            _c("code", "code.preferredCoding().code", "string"),
            _c("display", f"code.select({_DISPLAY})", "string"),
            _c("category", f"category.select({_FIRST_CODE})", "string"),
            _c("performed_start", "iif(performed.ofType(dateTime).exists(), performed.ofType(dateTime), "
                                  "performed.ofType(Period).start)", "dateTime"),
            _c("performed_end", "performed.ofType(Period).end", "dateTime"),
            _c("performed_precision", "iif(performed.ofType(dateTime).exists(), performed.ofType(dateTime), "
                                      "performed.ofType(Period).start).datePrecision()", "string"),
        ]}],
    },
}

#: FHIR resource type -> built-in table name
BUILTIN_BY_RESOURCE = {v["resource"]: k for k, v in BUILTIN_VIEWS.items()}


def builtin_view(name: str, schema: pa.Schema | None = None) -> CompiledView:
    return compile_view(BUILTIN_VIEWS[name], schema=schema)
