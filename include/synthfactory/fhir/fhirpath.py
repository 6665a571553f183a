"""A FHIRPath subset, compiled once into Python closures (no per-row parsing or tree interpretation).

It covers what SQL-on-FHIR v2 ViewDefinitions need (and a little more):

* paths, choice types (``value.ofType(Quantity)`` compiles to a direct ``valueQuantity`` lookup;
  ``value`` alone finds whichever ``value[x]`` is present), indexers ``name[0]``;
* literals (strings, numbers, booleans, ``{}``, ``@2020-01-01``), ``$this``, ``%resource``,
  ``%rootResource``, ``%rowIndex`` and view constants ``%name``;
* operators ``= != ~ !~ < <= > >= and or xor implies | + - * / div mod & in contains is as``;
* functions ``first last tail skip take single count empty exists all where select ofType distinct not
  iif join toString toInteger toDecimal toBoolean hasValue length lower upper startsWith endsWith contains
  substring matches replace extension getResourceKey getReferenceKey resolve trace allTrue anyTrue
  lowBoundary highBoundary`` (decimals, dates, dateTimes and times; whether a string is a date or a dateTime
  comes from the element it was read from, e.g. ``birthDate`` or ``value.ofType(dateTime)``, else its shape);
* synthfactory extensions (documented in README): ``preferredCoding()`` (LOINC > SNOMED CT > ICD-10-CM >
  RxNorm, else the first coding), ``systemAlias()`` (a code system URI to ``loinc``/``snomed``/``icd10cm``/
  ``rxnorm``, other URIs unchanged), ``datePrecision()`` (``year``/``month``/``day``/``second``) and
  ``getResourceKey(suffix)`` (the key of ``Type/id<suffix>``, e.g. one row per component).

Collections are Python lists; an expression compiles to ``fn(focus: list, env: Env) -> list``.
Keys are produced through ``env.key(type, id)`` (the salted HMAC), so no source id ever leaves.
"""

from __future__ import annotations

import re
import threading
from calendar import monthrange
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal, InvalidOperation
from typing import Any, Callable, Collection

from .normalize import (
    SYSTEM_SHORT,
    contained_key_id,
    date_precision,
    parse_reference,
    preferred_coding,
)
from synthfactory.errors import ConfigError

__all__ = ["FhirPathError", "Env", "compile_path", "CHOICE_TYPES"]

Fn = Callable[[list, "Env"], list]


class FhirPathError(ConfigError, ValueError):
    """An expression that cannot be parsed or compiled (raised once, at compile time)."""


class Env:
    """Per-resource evaluation state (one object reused for every row)."""

    __slots__ = ("resource", "this", "row_index", "constants", "key")

    def __init__(self, key: Callable[[str, str], str], constants: dict[str, Any] | None = None):
        self.key = key
        self.constants = constants or {}
        self.resource: Any = None
        self.this: Any = None
        self.row_index = 0


# FHIR data types usable as a choice-type suffix (value[x], effective[x], onset[x], ...).
CHOICE_TYPES = (
    "Quantity", "CodeableConcept", "String", "Boolean", "Integer", "DateTime", "Period", "Range", "Ratio",
    "SampledData", "Time", "Instant", "Date", "Decimal", "Age", "Reference", "Attachment", "Coding",
    "Identifier", "Timing", "Annotation", "Duration", "Uri", "Url", "Canonical", "Code", "Id", "Markdown",
    "PositiveInt", "UnsignedInt", "Base64Binary", "Oid", "Uuid", "Money", "Address", "ContactPoint",
    "HumanName", "Signature", "Count", "Distance", "Expression", "Meta", "Dosage", "ContactDetail",
    "RelatedArtifact", "UsageContext", "DataRequirement", "ParameterDefinition", "TriggerDefinition",
    "Integer64",
)
_PRIMITIVE_PY = {
    "boolean": (bool,), "integer": (int,), "unsignedInt": (int,), "positiveInt": (int,), "integer64": (int,),
    "decimal": (float, int), "string": (str,), "code": (str,), "id": (str,), "uri": (str,), "url": (str,),
    "canonical": (str,), "markdown": (str,), "oid": (str,), "uuid": (str,), "date": (str,),
    "dateTime": (str,), "instant": (str,), "time": (str,), "base64Binary": (str,),
}


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------
_TOKEN_RE = re.compile(
    r"""
    (?P<ws>\s+|//[^\n]*|/\*.*?\*/)
  | (?P<str>'(?:[^'\\]|\\.)*')
  | (?P<date>@[0-9T][0-9\-:T.+Z]*)
  | (?P<num>\d+(?:\.\d+)?)
  | (?P<bt>`(?:[^`\\]|\\.)*`)
  | (?P<var>[$%](?:[A-Za-z_][A-Za-z0-9_]*|`(?:[^`\\]|\\.)*`|'(?:[^'\\]|\\.)*'))
  | (?P<id>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op><=|>=|!=|!~|\{\}|[-+*/&|=~<>.,()\[\]])
    """,
    re.VERBOSE | re.DOTALL,
)
_ESCAPES = {"'": "'", '"': '"', "`": "`", "\\": "\\", "/": "/", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


def _unescape(body: str) -> str:
    out, i = [], 0
    while i < len(body):
        c = body[i]
        if c == "\\" and i + 1 < len(body):
            n = body[i + 1]
            if n == "u" and i + 5 < len(body):
                out.append(chr(int(body[i + 2:i + 6], 16)))
                i += 6
                continue
            out.append(_ESCAPES.get(n, n))
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


def _tokenize(text: str) -> list[tuple[str, Any]]:
    toks: list[tuple[str, Any]] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            raise FhirPathError(f"unexpected character {text[pos]!r} at {pos} in {text!r}")
        pos = m.end()
        kind = m.lastgroup
        val = m.group()
        if kind == "ws":
            continue
        if kind == "str":
            toks.append(("str", _unescape(val[1:-1])))
        elif kind == "bt":
            toks.append(("id", _unescape(val[1:-1])))
        elif kind == "var":
            name = val[1:]
            if name[:1] in "`'":
                name = _unescape(name[1:-1])
            toks.append(("var" if val[0] == "%" else "this", name))
        elif kind == "num":
            toks.append(("num", float(val) if "." in val else int(val)))
        elif kind == "date":
            toks.append(("date", val[1:]))
        elif kind == "id":
            if val in ("and", "or", "xor", "implies", "div", "mod", "in", "contains", "is", "as"):
                toks.append(("op", val))
            elif val in ("true", "false"):
                toks.append(("bool", val == "true"))
            else:
                toks.append(("id", val))
        else:
            toks.append(("op", val))
    toks.append(("end", None))
    return toks


# --------------------------------------------------------------------------------------------------
# Parser -> AST (tuples)
# --------------------------------------------------------------------------------------------------
# AST nodes: ("lit", value) ("empty",) ("this",) ("var", name) ("member", name) ("fn", name, [args])
#            ("chain", [nodes]) ("index", node) ("bin", op, left, right) ("neg", node) ("type", op, node, T)
_PRECEDENCE = [
    ("implies",), ("or", "xor"), ("and",), ("in", "contains"), ("=", "~", "!=", "!~"),
    ("<", ">", "<=", ">="), ("|",), ("is", "as"), ("+", "-", "&"), ("*", "/", "div", "mod"),
]


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.toks = _tokenize(text)
        self.i = 0

    def peek(self) -> tuple[str, Any]:
        return self.toks[self.i]

    def take(self) -> tuple[str, Any]:
        t = self.toks[self.i]
        self.i += 1
        return t

    def expect(self, kind: str, val: Any = None) -> tuple[str, Any]:
        t = self.take()
        if t[0] != kind or (val is not None and t[1] != val):
            raise FhirPathError(f"expected {val or kind!s} but found {t[1]!r} in {self.text!r}")
        return t

    def parse(self) -> tuple:
        node = self.expr(0)
        if self.peek()[0] != "end":
            raise FhirPathError(f"unexpected {self.peek()[1]!r} in {self.text!r}")
        return node

    def expr(self, level: int) -> tuple:
        if level == len(_PRECEDENCE):
            return self.unary()
        ops = _PRECEDENCE[level]
        left = self.expr(level + 1)
        while True:
            t = self.peek()
            if t[0] == "op" and t[1] in ops:
                self.take()
                if t[1] in ("is", "as"):
                    left = ("type", t[1], left, self.type_spec())
                else:
                    left = ("bin", t[1], left, self.expr(level + 1))
            else:
                return left

    def type_spec(self) -> str:
        name = self.expect("id")[1]
        while self.peek() == ("op", "."):
            self.take()
            name = self.expect("id")[1]  # FHIR.Quantity / System.String -> the last part
        return name

    def unary(self) -> tuple:
        t = self.peek()
        if t == ("op", "-"):
            self.take()
            return ("neg", self.unary())
        if t == ("op", "+"):
            self.take()
            return self.unary()
        return self.invocations(self.term())

    def term(self) -> tuple:
        kind, val = self.take()
        if kind == "str":
            return ("lit", val)
        if kind == "num":
            return ("lit", val)
        if kind == "bool":
            return ("lit", val)
        if kind == "date":
            return ("lit", val)
        if kind == "var":
            return ("var", val)
        if kind == "this":
            if val not in ("this", "index", "total"):
                raise FhirPathError(f"unknown variable ${val} in {self.text!r}")
            return ("var", "rowIndex") if val == "index" else ("this",)
        if kind == "op" and val == "{}":
            return ("empty",)
        if kind == "op" and val == "(":
            node = self.expr(0)
            self.expect("op", ")")
            return node
        if kind == "id":
            if self.peek() == ("op", "("):
                return self.call(val)
            return ("member", val)
        raise FhirPathError(f"unexpected {val!r} in {self.text!r}")

    def call(self, name: str) -> tuple:
        self.expect("op", "(")
        args: list = []
        if self.peek() != ("op", ")"):
            while True:
                args.append(self.expr(0))
                if self.peek() == ("op", ","):
                    self.take()
                    continue
                break
        self.expect("op", ")")
        return ("fn", name, args)

    def invocations(self, node: tuple) -> tuple:
        chain = [node]
        while True:
            t = self.peek()
            if t == ("op", "."):
                self.take()
                kind, val = self.take()
                if kind != "id":
                    if kind == "op" and val in ("contains", "in", "is", "as"):  # function forms
                        val = val
                    else:
                        raise FhirPathError(f"expected a name after '.' in {self.text!r}")
                if self.peek() == ("op", "("):
                    chain.append(self.call(val))
                else:
                    chain.append(("member", val))
            elif t == ("op", "["):
                self.take()
                idx = self.expr(0)
                self.expect("op", "]")
                chain.append(("index", idx))
            else:
                break
        return chain[0] if len(chain) == 1 else ("chain", chain)


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------
def _truth(coll: list) -> bool | None:
    """Singleton evaluation of a collection as a boolean: [] -> None (empty), [bool] -> it, [x] -> True."""
    if not coll:
        return None
    if len(coll) == 1:
        v = coll[0]
        return v if type(v) is bool else True
    raise FhirPathError("expected a single boolean, got a collection")


def _choice_suffix(t: str) -> str:
    return t[:1].upper() + t[1:]


def _is_type(v: Any, t: str) -> bool:
    py = _PRIMITIVE_PY.get(t)
    if py is not None:
        if t == "decimal":
            return type(v) in (float, int) and type(v) is not bool
        return type(v) in py
    if type(v) is not dict:
        return False
    rt = v.get("resourceType")
    if rt is not None:
        return rt == t or t in ("Resource", "DomainResource")
    # complex data types, recognised by shape (only reached without a choice-type name)
    if t == "Quantity" or t in ("Age", "Duration", "Distance", "Count", "SimpleQuantity"):
        return "value" in v and "coding" not in v and "reference" not in v
    if t == "CodeableConcept":
        return "coding" in v or ("text" in v and len(v) == 1)
    if t == "Coding":
        return "code" in v and "coding" not in v and "value" not in v
    if t == "Reference":
        return "reference" in v or "identifier" in v and "display" in v
    if t == "Period":
        return ("start" in v or "end" in v) and "value" not in v
    if t == "Range":
        return "low" in v or "high" in v
    if t == "Ratio":
        return "numerator" in v or "denominator" in v
    return False


def _eq(a: list, b: list) -> list:
    if not a or not b:
        return []
    if len(a) != len(b):
        return [False]
    for x, y in zip(a, b):
        if type(x) is bool or type(y) is bool:
            if x is not y:
                return [False]
        elif x != y:
            return [False]
    return [True]


def _equiv(a: list, b: list) -> list:
    if not a and not b:
        return [True]
    if len(a) != len(b):
        return [False]
    for x, y in zip(a, b):
        if type(x) is str and type(y) is str:
            if " ".join(x.lower().split()) != " ".join(y.lower().split()):
                return [False]
        elif x != y:
            return [False]
    return [True]


def _single(coll: list, what: str) -> Any:
    if len(coll) > 1:
        raise FhirPathError(f"{what}: expected a single value, got {len(coll)}")
    return coll[0] if coll else None


def _str(v: Any) -> str | None:
    if v is None:
        return None
    if type(v) is bool:
        return "true" if v else "false"
    if type(v) is str:
        return v
    if type(v) in (int, float):
        return repr(v) if type(v) is float else str(v)
    return None


# --------------------------------------------------------------------------------------------------
# Compiler
# --------------------------------------------------------------------------------------------------
_COMPILING = threading.local()


def compile_path(text: str, constants: Collection[str] | None = None) -> Fn:
    """Compile a FHIRPath expression to ``fn(focus, env) -> list``. ``constants``: the names a ViewDefinition
    defines (``%name``); given, any other ``%name`` is refused here rather than on the first row. Raises
    FhirPathError."""
    if not isinstance(text, str) or not text.strip():
        raise FhirPathError("empty expression")
    ast = _Parser(text).parse()
    saved = getattr(_COMPILING, "constants", None)
    _COMPILING.constants = None if constants is None else frozenset(constants)
    try:
        return _compile(ast, text)
    finally:
        _COMPILING.constants = saved


def _compile(node: tuple, text: str) -> Fn:
    kind = node[0]
    if kind == "lit":
        lit = [node[1]]
        return lambda focus, env: lit
    if kind == "empty":
        return lambda focus, env: []
    if kind == "this":
        def this(focus: list, env: Env) -> list:
            t = env.this
            return [t] if t is not None else []
        return this
    if kind == "var":
        return _compile_var(node[1], text)
    if kind == "member":
        return _member_path([node[1]])
    if kind == "fn":
        return _compile_fn(node[1], node[2], text)
    if kind == "index":
        raise FhirPathError(f"an indexer needs a collection in {text!r}")
    if kind == "chain":
        return _compile_chain(node[1], text)
    if kind == "neg":
        inner = _compile(node[1], text)

        def neg(focus: list, env: Env) -> list:
            return [-v for v in inner(focus, env) if type(v) in (int, float)]
        return neg
    if kind == "type":
        return _compile_type_op(node[1], _compile(node[2], text), node[3])
    if kind == "bin":
        return _compile_bin(node[1], _compile(node[2], text), _compile(node[3], text))
    raise FhirPathError(f"cannot compile {kind} in {text!r}")


def _compile_var(name: str, text: str) -> Fn:
    if name in ("resource", "rootResource", "context"):
        return lambda focus, env: [env.resource]
    if name == "rowIndex":
        return lambda focus, env: [env.row_index]
    if name in ("ucum",):
        return lambda focus, env: ["http://unitsofmeasure.org"]
    if name in ("sct",):
        return lambda focus, env: ["http://snomed.info/sct"]
    if name in ("loinc",):
        return lambda focus, env: ["http://loinc.org"]

    known = getattr(_COMPILING, "constants", None)
    if known is not None and name not in known:
        raise FhirPathError(f"unknown constant %{name} in {text!r}")

    def const(focus: list, env: Env) -> list:
        if name not in env.constants:
            raise FhirPathError(f"unknown constant %{name}")
        v = env.constants[name]
        return v if isinstance(v, list) else [v]
    return const


def _member_path(names: list[str]) -> Fn:
    """Navigate a run of element names in one closure (the hot path of every view)."""
    if len(names) == 1:
        name = names[0]

        def member1(focus: list, env: Env) -> list:
            out: list = []
            for it in focus:
                if type(it) is dict:
                    v = it.get(name)
                    if v is not None:
                        if type(v) is list:
                            out.extend(v)
                        else:
                            out.append(v)
            return out
        if name in _CHOICE_ROOTS:
            return _choice_member(name, member1)
        return member1

    fns = [_member_path([n]) for n in names]
    if any(n in _CHOICE_ROOTS for n in names):
        def chain_slow(focus: list, env: Env) -> list:
            for f in fns:
                focus = f(focus, env)
                if not focus:
                    return focus
            return focus
        return chain_slow
    names_t = tuple(names)

    def member_n(focus: list, env: Env) -> list:
        for name in names_t:
            out: list = []
            for it in focus:
                if type(it) is dict:
                    v = it.get(name)
                    if v is not None:
                        if type(v) is list:
                            out.extend(v)
                        else:
                            out.append(v)
            if not out:
                return out
            focus = out
        return focus
    return member_n


# element names that are choice types somewhere in R4 (value[x], effective[x], ...): a plain name that is
# absent is looked up as <name><Type>.
_CHOICE_ROOTS = frozenset((
    "value", "effective", "onset", "abatement", "deceased", "multipleBirth", "medication", "performed",
    "occurrence", "timing", "born", "age", "serviced", "product", "asNeeded", "defaultValue", "fixed",
    "pattern", "minValue", "maxValue", "allowed", "used", "reported", "collected", "scheduled", "rate", "dose",
    "doseNumber", "seriesDoses", "author",
))


def _choice_member(name: str, plain: Fn) -> Fn:
    keys = tuple(name + t for t in CHOICE_TYPES)

    def choice(focus: list, env: Env) -> list:
        out = plain(focus, env)
        if out:
            return out
        for it in focus:
            if type(it) is dict:
                for k in keys:
                    v = it.get(k)
                    if v is not None:
                        if type(v) is list:
                            out.extend(v)
                        else:
                            out.append(v)
                        break
        return out
    return choice


def _compile_chain(nodes: list[tuple], text: str) -> Fn:
    # fold: member runs into one closure; member + ofType(T) / as T into the choice key
    steps: list[Fn] = []
    run: list[str] = []
    i = 0
    first = True
    hint: str | None = None  # the FHIR type of the step before, where known (for lowBoundary/highBoundary)
    while i < len(nodes):
        n = nodes[i]
        nxt = nodes[i + 1] if i + 1 < len(nodes) else None
        hint, prev_hint = None, hint
        if n[0] == "member":
            hint = _member_type_hint(n[1])
            if n[1][:1].isupper() and first:  # leading type name: Patient.name
                tname = n[1]
                steps.append(lambda focus, env, _t=tname: [x for x in focus if type(x) is dict
                                                            and x.get("resourceType") == _t])
                i += 1
                first = False
                continue
            if nxt is not None and nxt[0] == "fn" and nxt[1] == "ofType" and len(nxt[2]) == 1 \
                    and nxt[2][0][0] in ("member", "chain"):
                tname = _type_name(nxt[2][0], text)
                hint = tname
                run.append(n[1] + _choice_suffix(tname))
                if tname in _PRIMITIVE_PY:  # valueString etc.: check the JSON type too
                    if run:
                        steps.append(_member_path(run))
                        run = []
                    steps.append(_of_type(tname))
                i += 2
                first = False
                continue
            run.append(n[1])
            i += 1
            first = False
            continue
        if run:
            steps.append(_member_path(run))
            run = []
        if n[0] == "index":
            hint = prev_hint
            steps.append(_indexer(_compile(n[1], text)))
        elif n[0] == "fn" and n[1] in ("lowBoundary", "highBoundary"):
            steps.append(_boundary(n[1], n[2], prev_hint, text))
        elif n[0] == "fn":
            if n[1] in ("ofType", "as") and len(n[2]) == 1 and n[2][0][0] in ("member", "chain"):
                hint = _type_name(n[2][0], text)
            elif n[1] in ("first", "last", "single", "tail", "skip", "take", "where", "distinct"):
                hint = prev_hint
            steps.append(_compile_fn(n[1], n[2], text))
        else:
            if not first:
                raise FhirPathError(f"unexpected term in a path in {text!r}")
            steps.append(_compile(n, text))
        first = False
        i += 1
    if run:
        steps.append(_member_path(run))
    if len(steps) == 1:
        return steps[0]
    steps_t = tuple(steps)

    def chain(focus: list, env: Env) -> list:
        for s in steps_t:
            focus = s(focus, env)
        return focus
    return chain


# --------------------------------------------------------------------------------------------------
# lowBoundary() / highBoundary()
# --------------------------------------------------------------------------------------------------
# R4 elements of type ``date`` (a value of one of them is a date, not a dateTime of day precision)
_DATE_ELEMENTS = frozenset(("birthDate", "valueDate", "expirationDate", "lockedDate", "assertedDate",
                            "dateOfBirth"))
_TIME_RE = re.compile(r"^(\d\d)(?::(\d\d)(?::(\d\d)(\.\d+)?)?)?$")
_DATETIME_RE = re.compile(r"^(\d{4})(?:-(\d\d)(?:-(\d\d)(?:T(\d\d)(?::(\d\d)(?::(\d\d)(\.\d+)?)?)?"
                          r"(Z|[+-]\d\d:\d\d)?)?)?)?$")


def _member_type_hint(name: str) -> str | None:
    if name in _DATE_ELEMENTS:
        return "date"
    for suffix, t in (("DateTime", "dateTime"), ("Instant", "instant"), ("Time", "time"), ("Date", "date")):
        if name.endswith(suffix) and name[:-len(suffix)] in _CHOICE_ROOTS:
            return t
    return None


def _frac(frac: str | None, high: bool) -> str:
    digits = (frac or ".")[1:]
    return "." + (digits + ("9" if high else "0") * 3)[:max(3, len(digits))]


def _boundary_of(v: Any, high: bool, hint: str | None, precision: int | None) -> Any:
    """The FHIRPath lowBoundary()/highBoundary() of one value (None where it has none)."""
    tv = type(v)
    if tv is int or tv is float:
        if hint not in (None, "decimal", "integer"):
            return None
        try:
            d = Decimal(repr(v))
        except InvalidOperation:
            return None
        if not d.is_finite():
            return None
        exp = min(d.as_tuple().exponent, 0)
        half = Decimal(5).scaleb(exp - 1)
        b = d + half if high else d - half
        if precision is not None:
            if not 0 <= precision <= 28:
                return None
            b = b.quantize(Decimal(1).scaleb(-precision), rounding=ROUND_CEILING if high else ROUND_FLOOR)
        return float(b)
    if tv is not str:
        return None
    if hint == "time" or (hint is None and _TIME_RE.match(v)):
        m = _TIME_RE.match(v)
        if m is None:
            return None
        hh, mm, ss, frac = m.groups()
        fill = "59" if high else "00"
        out = f"{hh}:{mm or fill}:{ss or fill}{_frac(frac, high)}"
        if precision is not None:
            cut = {2: 2, 4: 5, 6: 8, 9: 12}.get(precision)
            return out[:cut] if cut else None
        return out
    m = _DATETIME_RE.match(v)
    if m is None:
        return None
    y, mo, d, hh, mi, ss, frac, tz = m.groups()
    mo = mo or ("12" if high else "01")
    if d is None:
        d = f"{monthrange(int(y), int(mo))[1]:02d}" if high else "01"
    date = f"{y}-{mo}-{d}"
    if hint == "date" or (hint is None and hh is None):
        if precision is not None:
            cut = {4: 4, 6: 7, 8: 10}.get(precision)
            return date[:cut] if cut else None
        return date
    fill = "59" if high else "00"
    hh = hh or ("23" if high else "00")
    out = f"{date}T{hh}:{mi or fill}:{ss or fill}{_frac(frac, high)}"
    tz = tz or ("-12:00" if high else "+14:00")
    if precision is not None:
        cut = {4: 4, 6: 7, 8: 10, 10: 13, 12: 16, 14: 19, 17: len(out)}.get(precision)
        if cut is None:
            return None
        return out[:cut] + (tz if precision >= 10 else "")
    return out + tz


def _boundary(name: str, args: list, hint: str | None, text: str) -> Fn:
    if len(args) > 1:
        raise FhirPathError(f"{name}() takes 0..1 argument(s), got {len(args)}, in {text!r}")
    prec = _compile(args[0], text) if args else None
    high = name == "highBoundary"

    def boundary(f: list, e: Env) -> list:
        if not f:
            return []
        v = _single(f, f"{name}()")
        p = None
        if prec is not None:
            pv = prec(f, e)
            if not pv or type(pv[0]) is not int:
                return []
            p = pv[0]
        b = _boundary_of(v, high, hint, p)
        return [] if b is None else [b]
    return boundary


def _type_name(node: tuple, text: str) -> str:
    if node[0] == "member":
        return node[1]
    if node[0] == "chain" and all(n[0] == "member" for n in node[1]):
        return node[1][-1][1]
    raise FhirPathError(f"expected a type name in {text!r}")


def _indexer(idx: Fn) -> Fn:
    def index(focus: list, env: Env) -> list:
        i = idx(focus, env)
        if not i or type(i[0]) is not int:
            return []
        j = i[0]
        return [focus[j]] if 0 <= j < len(focus) else []
    return index


def _of_type(t: str) -> Fn:
    return lambda focus, env: [x for x in focus if _is_type(x, t)]


def _compile_type_op(op: str, inner: Fn, t: str) -> Fn:
    if op == "as":
        return lambda focus, env: [x for x in inner(focus, env) if _is_type(x, t)]

    def is_(focus: list, env: Env) -> list:
        v = inner(focus, env)
        if not v:
            return []
        return [_is_type(_single(v, "is"), t)]
    return is_


def _compile_bin(op: str, left: Fn, right: Fn) -> Fn:
    if op == "=":
        return lambda f, e: _eq(left(f, e), right(f, e))
    if op == "!=":
        def ne(f: list, e: Env) -> list:
            r = _eq(left(f, e), right(f, e))
            return [not r[0]] if r else r
        return ne
    if op == "~":
        return lambda f, e: _equiv(left(f, e), right(f, e))
    if op == "!~":
        return lambda f, e: [not _equiv(left(f, e), right(f, e))[0]]
    if op in ("<", ">", "<=", ">="):
        import operator as _op

        cmp = {"<": _op.lt, ">": _op.gt, "<=": _op.le, ">=": _op.ge}[op]

        def compare(f: list, e: Env) -> list:
            a, b = left(f, e), right(f, e)
            if not a or not b:
                return []
            x, y = _single(a, op), _single(b, op)
            if type(x) is bool or type(y) is bool:
                return []
            num = (int, float)
            if type(x) in num and type(y) in num or type(x) is str and type(y) is str:
                return [cmp(x, y)]
            return []
        return compare
    if op in ("and", "or"):
        decides = op == "or"  # the operand value that alone decides: False for and, True for or

        def junction(f: list, e: Env) -> list:
            a = _truth(left(f, e))
            if a is decides:
                return [decides]
            b = _truth(right(f, e))
            if b is decides:
                return [decides]
            if a is not None and b is not None:  # both the other value
                return [not decides]
            return []
        return junction
    if op == "xor":
        def xor(f: list, e: Env) -> list:
            a, b = _truth(left(f, e)), _truth(right(f, e))
            return [] if a is None or b is None else [a != b]
        return xor
    if op == "implies":
        def implies(f: list, e: Env) -> list:
            a = _truth(left(f, e))
            if a is False:
                return [True]
            b = _truth(right(f, e))
            if b is True:
                return [True]
            if a is True:
                return [] if b is None else [False]
            return [True] if b is True else []
        return implies
    if op == "|":
        def union(f: list, e: Env) -> list:
            out: list = []
            for v in left(f, e) + right(f, e):
                if not any(v == o and type(v) is type(o) for o in out):
                    out.append(v)
            return out
        return union
    if op == "&":
        def concat(f: list, e: Env) -> list:
            a, b = left(f, e), right(f, e)
            return [(_str(_single(a, "&")) or "") + (_str(_single(b, "&")) or "")]
        return concat
    if op in ("+", "-", "*", "/", "div", "mod"):
        def arith(f: list, e: Env) -> list:
            a, b = left(f, e), right(f, e)
            if not a or not b:
                return []
            x, y = _single(a, op), _single(b, op)
            if op == "+" and type(x) is str and type(y) is str:
                return [x + y]
            if type(x) not in (int, float) or type(y) not in (int, float):
                return []
            if op == "+":
                return [x + y]
            if op == "-":
                return [x - y]
            if op == "*":
                return [x * y]
            if y == 0:
                return []
            if op == "/":
                return [x / y]
            if op == "div":
                return [int(x // y)]
            return [x % y]
        return arith
    if op == "in":
        def in_(f: list, e: Env) -> list:
            a = left(f, e)
            if not a:
                return []
            return [_single(a, "in") in right(f, e)]
        return in_
    if op == "contains":
        def contains(f: list, e: Env) -> list:
            b = right(f, e)
            if not b:
                return []
            return [_single(b, "contains") in left(f, e)]
        return contains
    raise FhirPathError(f"unsupported operator {op}")


def _iterate(crit: Fn, focus: list, env: Env) -> list[tuple[Any, list]]:
    """Evaluate ``crit`` once per item with $this (and the focus) set to the item."""
    saved = env.this
    out = []
    try:
        for it in focus:
            env.this = it
            out.append((it, crit([it], env)))
    finally:
        env.this = saved
    return out


def _compile_fn(name: str, args: list[tuple], text: str) -> Fn:  # noqa: C901 - a dispatch table
    n = len(args)

    def need(lo: int, hi: int) -> None:
        if not lo <= n <= hi:
            raise FhirPathError(f"{name}() takes {lo}..{hi} argument(s), got {n}, in {text!r}")

    def arg(i: int) -> Fn:
        return _compile(args[i], text)

    if name == "first":
        need(0, 0)
        return lambda f, e: f[:1]
    if name == "last":
        need(0, 0)
        return lambda f, e: f[-1:]
    if name == "tail":
        need(0, 0)
        return lambda f, e: f[1:]
    if name in ("skip", "take"):
        need(1, 1)
        a = arg(0)

        def skip_take(f: list, e: Env) -> list:
            k = a(f, e)
            if not k or type(k[0]) is not int:
                return []
            return f[k[0]:] if name == "skip" else f[:max(k[0], 0)]
        return skip_take
    if name == "single":
        need(0, 0)
        return lambda f, e: [_single(f, "single()")] if f else []
    if name == "count":
        need(0, 0)
        return lambda f, e: [len(f)]
    if name == "empty":
        need(0, 0)
        return lambda f, e: [not f]
    if name == "exists":
        need(0, 1)
        if n == 0:
            return lambda f, e: [bool(f)]
        crit = arg(0)
        return lambda f, e: [any(_truth(r) is True for _, r in _iterate(crit, f, e))]
    if name == "all":
        need(1, 1)
        crit = arg(0)
        return lambda f, e: [all(_truth(r) is True for _, r in _iterate(crit, f, e))]
    if name in ("allTrue", "anyTrue", "allFalse", "anyFalse"):
        need(0, 0)
        want = name.endswith("True")
        if name.startswith("all"):
            return lambda f, e: [all(v is want for v in f)]
        return lambda f, e: [any(v is want for v in f)]
    if name == "where":
        need(1, 1)
        crit = arg(0)
        return lambda f, e: [it for it, r in _iterate(crit, f, e) if _truth(r) is True]
    if name == "select":
        need(1, 1)
        proj = arg(0)

        def select(f: list, e: Env) -> list:
            out: list = []
            for _, r in _iterate(proj, f, e):
                out.extend(r)
            return out
        return select
    if name in ("ofType", "as"):
        need(1, 1)
        return _of_type(_type_name(args[0], text))
    if name == "is":
        need(1, 1)
        t = _type_name(args[0], text)
        return lambda f, e: [_is_type(_single(f, "is()"), t)] if f else []
    if name == "distinct":
        need(0, 0)

        def distinct(f: list, e: Env) -> list:
            out: list = []
            for v in f:
                if not any(v == o and type(v) is type(o) for o in out):
                    out.append(v)
            return out
        return distinct
    if name == "not":
        need(0, 0)

        def not_(f: list, e: Env) -> list:
            t = _truth(f)
            return [] if t is None else [not t]
        return not_
    if name == "iif":
        need(2, 3)
        crit, yes = arg(0), arg(1)
        no = arg(2) if n == 3 else (lambda f, e: [])

        def iif(f: list, e: Env) -> list:
            saved = e.this
            if len(f) == 1:
                e.this = f[0]
            try:
                return yes(f, e) if _truth(crit(f, e)) is True else no(f, e)
            finally:
                e.this = saved
        return iif
    if name == "join":
        need(0, 1)
        sep = arg(0) if n else (lambda f, e: [""])

        def join(f: list, e: Env) -> list:
            s = sep(f, e)
            parts = [_str(v) for v in f]
            return [(s[0] if s else "").join(p for p in parts if p is not None)]  # over nothing: ''

        return join
    if name == "toString":
        need(0, 0)
        return lambda f, e: [s for s in (_str(_single(f, "toString()")),) if s is not None] if f else []
    if name == "toInteger":
        need(0, 0)

        def to_int(f: list, e: Env) -> list:
            if not f:
                return []
            v = _single(f, "toInteger()")
            if type(v) is int:
                return [v]
            if type(v) is bool:
                return [int(v)]
            if type(v) is str and re.fullmatch(r"[+-]?\d+", v):
                return [int(v)]
            return []
        return to_int
    if name == "toDecimal":
        need(0, 0)

        def to_dec(f: list, e: Env) -> list:
            if not f:
                return []
            v = _single(f, "toDecimal()")
            if type(v) in (int, float):
                return [float(v)]
            if type(v) is bool:
                return [1.0 if v else 0.0]
            if type(v) is str and re.fullmatch(r"[+-]?\d+(\.\d+)?", v):
                return [float(v)]
            return []
        return to_dec
    if name == "toBoolean":
        need(0, 0)
        tv = {"true": True, "t": True, "yes": True, "y": True, "1": True, "1.0": True,
              "false": False, "f": False, "no": False, "n": False, "0": False, "0.0": False}

        def to_bool(f: list, e: Env) -> list:
            if not f:
                return []
            v = _single(f, "toBoolean()")
            if type(v) is bool:
                return [v]
            s = _str(v)
            r = tv.get(s.lower()) if s is not None else None
            return [] if r is None else [r]
        return to_bool
    if name == "hasValue":
        need(0, 0)
        return lambda f, e: [len(f) == 1 and type(f[0]) is not dict]
    if name == "length":
        need(0, 0)
        return lambda f, e: [len(f[0])] if f and type(f[0]) is str else []
    if name in ("lower", "upper"):
        need(0, 0)
        up = name == "upper"
        return lambda f, e: [(f[0].upper() if up else f[0].lower())] if f and type(f[0]) is str else []
    if name in ("startsWith", "endsWith"):
        need(1, 1)
        a = arg(0)
        ends = name == "endsWith"

        def starts_ends(f: list, e: Env) -> list:
            if not f or type(f[0]) is not str:
                return []
            s = a(f, e)
            if not s or type(s[0]) is not str:
                return []
            return [f[0].endswith(s[0]) if ends else f[0].startswith(s[0])]
        return starts_ends
    if name == "contains":
        need(1, 1)
        a = arg(0)

        def str_contains(f: list, e: Env) -> list:
            if not f or type(f[0]) is not str:
                return []
            s = a(f, e)
            return [s[0] in f[0]] if s and type(s[0]) is str else []
        return str_contains
    if name == "substring":
        need(1, 2)
        a = arg(0)
        b = arg(1) if n == 2 else None

        def substring(f: list, e: Env) -> list:
            if not f or type(f[0]) is not str:
                return []
            s = a(f, e)
            if not s or type(s[0]) is not int or not 0 <= s[0] < len(f[0]):
                return []
            if b is None:
                return [f[0][s[0]:]]
            ln = b(f, e)
            return [f[0][s[0]:s[0] + ln[0]]] if ln and type(ln[0]) is int else [f[0][s[0]:]]
        return substring
    if name in ("matches", "replaceMatches"):
        need(1 if name == "matches" else 2, 1 if name == "matches" else 2)
        if args[0][0] != "lit" or type(args[0][1]) is not str:
            raise FhirPathError(f"{name}() needs a literal pattern in {text!r}")
        rx = re.compile(args[0][1])
        if name == "matches":
            return lambda f, e: [bool(rx.search(f[0]))] if f and type(f[0]) is str else []
        rep = arg(1)
        return lambda f, e: [rx.sub((rep(f, e) or [""])[0], f[0])] if f and type(f[0]) is str else []
    if name == "replace":
        need(2, 2)
        a, b = arg(0), arg(1)

        def replace(f: list, e: Env) -> list:
            if not f or type(f[0]) is not str:
                return []
            x, y = a(f, e), b(f, e)
            if not x or not y:
                return []
            return [f[0].replace(x[0], y[0])]
        return replace
    if name == "trace":
        return lambda f, e: f
    if name == "extension":
        need(1, 1)
        if args[0][0] == "lit":
            url = args[0][1]

            def extension(f: list, e: Env) -> list:
                out: list = []
                for it in f:
                    if type(it) is dict:
                        for x in it.get("extension") or ():
                            if type(x) is dict and x.get("url") == url:
                                out.append(x)
                return out
            return extension
        a = arg(0)

        def extension_dyn(f: list, e: Env) -> list:
            u = a(f, e)
            if not u:
                return []
            return [x for it in f if type(it) is dict for x in it.get("extension") or ()
                    if type(x) is dict and x.get("url") == u[0]]
        return extension_dyn
    if name == "getResourceKey":
        need(0, 1)
        suffix = arg(0) if n else None

        def resource_key(f: list, e: Env) -> list:
            out = []
            sfx = ""
            if suffix is not None:
                s = suffix(f, e)
                sfx = _str(s[0]) or "" if s else ""
            for it in f:
                if type(it) is dict:
                    rt, rid = it.get("resourceType"), it.get("id")
                    if type(rt) is str and type(rid) is str and rid:
                        out.append(e.key(rt, rid + sfx))
            return out
        return resource_key
    if name == "getReferenceKey":
        need(0, 1)
        want = _type_name(args[0], text) if n else None
        return _reference_key(want)
    if name == "resolve":
        need(0, 0)

        def resolve(f: list, e: Env) -> list:
            out: list = []
            res = e.resource
            for it in f:
                ref = it.get("reference") if type(it) is dict else it if type(it) is str else None
                if type(ref) is str and ref.startswith("#") and type(res) is dict:
                    for c in res.get("contained") or ():
                        if type(c) is dict and c.get("id") == ref[1:]:
                            out.append(c)
            return out
        return resolve
    if name in ("lowBoundary", "highBoundary"):
        return _boundary(name, args, None, text)
    # -- synthfactory extensions ----------------------------------------------------------------
    if name == "preferredCoding":
        need(0, 0)
        return lambda f, e: [c for c in (preferred_coding(x) for x in f) if c is not None]
    if name == "systemAlias":
        need(0, 0)
        return lambda f, e: [SYSTEM_SHORT.get(x, x) for x in f if type(x) is str]
    if name == "datePrecision":
        need(0, 0)
        return lambda f, e: [p for p in (date_precision(x) for x in f) if p is not None]
    raise FhirPathError(f"unsupported function {name}() in {text!r}")


def _reference_key(want: str | None) -> Fn:
    cache: dict[str, str | None] = {}
    owner: list = [None]  # the key function the cache was filled with (one per ingest session)

    def reference_key(f: list, e: Env) -> list:
        out = []
        if owner[0] is not e.key:
            cache.clear()
            owner[0] = e.key
        for it in f:
            ref = it.get("reference") if type(it) is dict else None
            if type(ref) is not str or not ref:
                continue
            if ref[0] == "#":
                hit = contained_key_id(e.resource, ref, want) if type(e.resource) is dict else None
                if hit is not None:
                    out.append(e.key(hit[0], hit[1]))
                continue
            k = cache.get(ref)
            if k is None:
                if ref in cache:
                    continue
                t, rid = parse_reference(ref)
                if rid is None or (want is not None and t is not None and t != want) or (t is None and want is None):
                    k = None
                else:
                    k = e.key(want or t, rid)
                if len(cache) >= 1 << 16:
                    cache.clear()
                cache[ref] = k
                if k is None:
                    continue
            out.append(k)
        return out
    return reference_key
