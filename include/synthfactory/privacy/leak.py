"""Leak scan: prove that no real identifier string appears in any output file.

Identifiers (resource ids, MRNs, names, family names, address lines, phones, salted HMAC keys) are
written by ingest to ``identifiers.parquet`` (columns ``value``, ``kind``). Every output file is read
through :class:`~synthfactory.storage.Store`:

* Parquet files (recognised by their ``PAR1`` magic bytes) are read with pyarrow: the values of every
  string / large_string / string_view / binary / dictionary column (also inside lists, structs and
  maps), every column and field name, and the schema's key/value metadata are scanned.
* Any other file (JSON, NDJSON, CSV, HTML, text; gzip is decompressed) is scanned as its raw bytes,
  decoded as UTF-8 (undecodable bytes replaced).

Matching is case-insensitive and token based: text is lower-cased and split into alphanumeric tokens
(anything else, ``_`` included, separates); an identifier becomes a token tuple and matches where that
tuple occurs as a contiguous n-gram of the file's token stream. So ``"Emet Dummett"`` is found inside
``"note: patient EMET  dummett, seen"`` and a UUID inside ``"Patient/<uuid>"``, but a name is not found
as part of a longer word. Phone-like identifiers (digits only, at least 7 of them) also match with
their digits run together. Parquet cells are separated so an n-gram never spans two cells. Only
n-grams that start with the first token of some identifier are built, so the scan is linear in the
file's tokens whatever the number of identifiers.

A full name (kind ``name``, two or more tokens) also matches with its last token (the family name) moved
to the front ("Ward, Amy" for "Amy Ward") and, for three or more tokens, as first + last token in either
order ("Amy Ward" for "Amy Jo Ward").

Short identifiers (fewer than ``min_len`` characters after stripping) are matched like any other, as exact
whole tokens, except the ones no text search can tell apart from ordinary text: only digits ("42", which
any report's figures contain) or a common word (an id "to"). Those are *unscanned*: counted in
``identifiers_unscanned`` with their kinds, and the result's ``clean`` is then ``None`` (not ``True``) unless
there are hits (``False``): the scan cannot say the files are clean, and the gate treats anything but
``True`` as not clean. Identifiers without any letter or digit ("-") identify nobody and are skipped.

A one-word name (kind ``family``, ``name`` or ``given``: a family name on its own) is not, alone, evidence of
a leak when that word is

* a common English word (:data:`synthfactory.privacy._words.COMMON_WORDS`, vendored: Faker's en_US word
  list and scikit-learn's English stop words): "Little", "Hand", "Young", "May", "White";
* a word of the product's own text (the data card template, report keys and messages: every word of the
  ``synthfactory`` package's Python source but this module, read once per process), as in the card's
  "too little real data";
* a word of the real data's public vocabulary (``vocabulary``, see :func:`public_vocabulary`): column
  names, category values held by at least k real records ("White", "Black" of the race categories: a
  value k or more people share identifies none of them) and code displays ("Admission to ward").

Such names are counted in ``identifiers_vocabulary`` and not searched on their own; the full names they
are part of, and ids, MRNs, addresses, telecoms and keys always are, exactly as strictly as before.
(``common_words=False`` leaves out the first two sources.) Ingest collects no birth dates, so none are
searched.

The result and the log carry counts, file URIs and identifier *kinds* only, never identifier values.
(``fingerprints=True`` adds a 12-hex sha256 prefix per matched identifier, to let an operator with
access to the identifier list find the culprit; off by default since a hash of a low-entropy value
such as a phone number can be confirmed by guessing.)
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

if TYPE_CHECKING:  # storage imports pyarrow; keep this module importable without it
    from synthfactory.storage import Store

log = logging.getLogger(__name__)

__all__ = ["Identifier", "load_identifiers", "leak_scan", "tokenize", "infer_kind", "public_vocabulary"]

#: identifier kinds that a one-word common / product / public word may excuse (see the module doc)
_WORD_KINDS = frozenset({"family", "name", "given"})
#: full-name kinds that also match in the other order
_NAME_KINDS = frozenset({"name"})

_TOKEN = re.compile(r"[^\W_]+")
_TOKEN_OR_SEP = re.compile(r"[^\W_]+|\x1f")
_SEP = "\x1f"  # cell separator token for Parquet values: never part of an identifier
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.I)
_HEX32 = re.compile(r"^[0-9a-f]{32}$", re.I)
_PHONE = re.compile(r"^[\d\s()+.\-]+$")
_PARQUET_MAGIC = b"PAR1"


class Identifier(str):
    """A ``str`` (the identifier value) that also carries its ``kind`` from identifiers.parquet."""

    kind: str

    def __new__(cls, value: str, kind: str | None = None) -> "Identifier":
        obj = super().__new__(cls, value)
        obj.kind = kind or infer_kind(value)
        return obj

    def __reduce__(self) -> Any:
        return (Identifier, (str(self), self.kind))


def infer_kind(value: str) -> str:
    """A coarse kind from the shape of a value, for identifiers passed without one."""
    v = value.strip()
    if _UUID.match(v):
        return "uuid"
    if _HEX32.match(v):
        return "hmac_key"
    if _PHONE.match(v) and sum(ch.isdigit() for ch in v) >= 7:
        return "phone_or_number"
    if v.isdigit():
        return "number"
    return "text"


def tokenize(text: str) -> list[str]:
    """Lower-case alphanumeric tokens of ``text``."""
    return _TOKEN.findall(text.lower())


def load_identifiers(uri: str, store: "Store") -> list[str]:
    """Identifier values from ingest's ``identifiers.parquet`` (columns ``value``, ``kind``).

    Each element is an :class:`Identifier` (a ``str``) whose ``.kind`` comes from the ``kind`` column
    (inferred from its shape where that column is absent or null). Nulls and duplicates are dropped.
    """
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(store.read_bytes(uri)))
    if "value" not in table.column_names:
        raise ValueError(f"{uri}: identifiers file has no 'value' column")
    values = table.column("value").to_pylist()
    kinds = table.column("kind").to_pylist() if "kind" in table.column_names else [None] * len(values)
    seen: set[tuple[str, str | None]] = set()
    out: list[str] = []
    for v, k in zip(values, kinds):
        if v is None:
            continue
        v = v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
        if (v, k) in seen:
            continue
        seen.add((v, k))
        out.append(Identifier(v, None if k is None else str(k)))
    log.info("loaded %d identifiers from %s", len(out), uri)
    return out


# ------------------------------------------------------------------------------------------------
# identifier index
# ------------------------------------------------------------------------------------------------
@dataclass
class _Index:
    #: token tuple -> set of kinds of the identifiers that normalise to it
    kinds: dict[tuple[str, ...], set[str]]
    #: first token -> the n-gram lengths of the identifiers starting with it
    starts: dict[str, tuple[int, ...]]
    #: token tuple -> the canonical tuple it reports as (variants such as joined phone digits)
    canonical: dict[tuple[str, ...], tuple[str, ...]]
    checked: int
    skipped: int
    vocabulary: int = 0
    #: kinds of the identifiers that could not be scanned (short numbers, short common words)
    unscanned: Counter = field(default_factory=Counter)


@lru_cache(maxsize=1)
def product_words() -> frozenset[str]:
    """Every word (token) of the product's own text: the ``synthfactory`` package's Python source (the data
    card template, report keys, messages, column names), this module and the common-word list left out.
    Read once per process (about 30 ms)."""
    root = Path(__file__).resolve().parent.parent
    skip = {Path(__file__).resolve(), (Path(__file__).parent / "_words.py").resolve()}
    words: set[str] = set()
    for path in sorted(root.rglob("*.py")):
        if path.resolve() in skip:
            continue
        try:
            words.update(_TOKEN.findall(path.read_text("utf-8", "replace").lower()))
        except OSError:  # an unreadable file only means fewer excuses: the scan stays strict
            continue
    return frozenset(words)


def _excuse_words(vocabulary: set[tuple[str, ...]] | None, common_words: bool) -> frozenset[str]:
    from synthfactory.privacy._words import COMMON_WORDS

    words: set[str] = {t[0] for t in vocabulary or () if len(t) == 1}
    if common_words:
        return frozenset(words | COMMON_WORDS | product_words())
    return frozenset(words)


def _display_column(name: str) -> bool:
    """A code's display text ("display", "type_display"): terminology, public whatever its frequency."""
    return str(name).lower().endswith("display")


def public_vocabulary(frame: Any, *, min_count: int = 5, tables: Iterable[str] = (),
                      store: "Store | None" = None) -> set[tuple[str, ...]]:
    """The words of ``frame``'s category values held by at least ``min_count`` rows (``frame`` is the real
    training table; "Black or African American" gives "black", "or", "african", "american"), the words
    of its code displays (columns named ``*display``, whatever their frequency: "Admission to ward" is the
    terminology's text for a code, no one's datum) and the words of its column names, as 1-token tuples for
    :func:`leak_scan`'s ``vocabulary``. Only string, categorical and boolean columns count; numbers never
    excuse a name.

    ``tables`` (URIs of further real tables, e.g. ingest's relational tables, read through ``store``) add the
    words of their column names and of their ``*display`` columns (only those columns are read)."""
    import pandas as pd

    vocab: set[tuple[str, ...]] = set()
    for name in frame.columns:
        vocab.update((t,) for t in tokenize(str(name)))
        s = frame[name]
        if not (pd.api.types.is_object_dtype(s) or isinstance(s.dtype, pd.CategoricalDtype)
                or pd.api.types.is_string_dtype(s) or pd.api.types.is_bool_dtype(s)):
            continue
        counts = s.dropna().astype(str).value_counts()
        floor = 1 if _display_column(name) else min_count
        for value, n in counts.items():
            if n < floor:
                break  # value_counts is sorted, most frequent first
            vocab.update((t,) for t in tokenize(value))
    uris = [u for u in tables if u]
    if uris:
        if store is None:
            raise ValueError("public_vocabulary: tables need a store to read them")
        import pyarrow as pa
        import pyarrow.parquet as pq

        from synthfactory.storage import is_s3

        for uri in uris:  # a local file is read column by column; S3 objects come whole
            with pq.ParquetFile(io.BytesIO(store.read_bytes(uri)) if is_s3(uri) else uri) as pf:
                schema = pf.schema_arrow
                cols = [f.name for f in schema if _display_column(f.name)
                        and (pa.types.is_string(f.type) or pa.types.is_large_string(f.type)
                             or pa.types.is_dictionary(f.type))]
                table = pf.read(columns=cols) if cols else None
            for name in schema.names:
                vocab.update((t,) for t in tokenize(str(name)))
            for name in cols:
                for chunk in table.column(name).chunks:
                    for values in _strings_of(chunk):  # the distinct values of the chunk
                        for value in values:
                            vocab.update((t,) for t in tokenize(value))
    return vocab


def _unscannable(toks: tuple[str, ...]) -> bool:
    """A short identifier that no text search can tell from ordinary text: digits only, or common English
    words (the fixed list, not the product's or the data's words: a short id equal to one of those is
    searched, and a hit says where)."""
    from synthfactory.privacy._words import COMMON_WORDS

    return all(t.isdigit() or t in COMMON_WORDS for t in toks)


def _build_index(identifiers: Iterable[str], min_len: int,
                 vocabulary: set[tuple[str, ...]] | None = None, common_words: bool = False) -> _Index:
    kinds: dict[tuple[str, ...], set[str]] = defaultdict(set)
    canonical: dict[tuple[str, ...], tuple[str, ...]] = {}
    skipped = 0
    unscanned: Counter = Counter()
    excused: set[tuple[str, ...]] = set()
    excuse = _excuse_words(vocabulary, common_words)
    variants: list[tuple[tuple[str, ...], tuple[str, ...]]] = []
    for ident in identifiers:
        if ident is None:
            continue
        value = str(ident)
        toks = tuple(tokenize(value))
        if not toks:  # no letter or digit at all ("-"): identifies no one
            skipped += 1
            continue
        kind = getattr(ident, "kind", None) or infer_kind(value)
        if len(toks) == 1 and kind in _WORD_KINDS and toks[0] in excuse:
            excused.add(toks)
            continue
        if len(value.strip()) < min_len and _unscannable(toks):
            unscanned[kind] += 1
            continue
        kinds[toks].add(kind)
        canonical.setdefault(toks, toks)
        if len(toks) > 1 and all(t.isdigit() for t in toks) and sum(map(len, toks)) >= 7:
            variants.append((("".join(toks),), toks))
        if kind in _NAME_KINDS and len(toks) > 1:  # "Ward Amy" / "Ward, Amy"; "Amy Ward" of "Amy Jo Ward"
            variants.append(((toks[-1], *toks[:-1]), toks))
            if len(toks) > 2:
                variants += [((toks[0], toks[-1]), toks), ((toks[-1], toks[0]), toks)]
    for variant, toks in variants:  # an identifier's own tuple reports as itself
        canonical.setdefault(variant, toks)
    starts: dict[str, set[int]] = defaultdict(set)
    for toks in canonical:
        starts[toks[0]].add(len(toks))
    return _Index(
        kinds=dict(kinds),
        starts={t: tuple(sorted(ns)) for t, ns in starts.items()},
        canonical=canonical,
        checked=len(kinds),
        skipped=skipped + sum(unscanned.values()),
        vocabulary=len(excused - set(kinds)),
        unscanned=unscanned,
    )


#: identifier kinds that are numbers of a table's id column: never matched as part of a decimal number
_NUMBER_ID_KINDS = frozenset({"table_id"})


def _match(tokens: list[str], index: _Index, found: Counter, decimals: set[int] | None = None) -> None:
    """Count occurrences of identifier n-grams in ``tokens`` into ``found`` (canonical tuples). ``decimals``:
    positions of tokens that are a part of a decimal number ("105.140769"), where a digits-only table id
    ("140769", kind ``table_id``) is not matched (a plot coordinate or a figure, not an id)."""
    starts = index.starts
    canonical = index.canonical
    n_tok = len(tokens)
    for i, t in enumerate(tokens):
        ns = starts.get(t)
        if ns is None:
            continue
        for n in ns:
            if i + n > n_tok:
                break
            gram = (t,) if n == 1 else tuple(tokens[i:i + n])
            hit = canonical.get(gram)
            if hit is not None:
                if n == 1 and decimals and i in decimals and t.isdigit() and \
                        index.kinds.get(hit, set()) <= _NUMBER_ID_KINDS:
                    continue
                found[hit] += 1


# ------------------------------------------------------------------------------------------------
# file readers
# ------------------------------------------------------------------------------------------------
def _strings_of(arr: Any) -> Iterator[list[str]]:
    """Lists of the string values inside a pyarrow Array, recursing into nested types."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = arr.type
    if pa.types.is_dictionary(t):
        yield from _strings_of(arr.dictionary)
    elif (pa.types.is_string(t) or pa.types.is_large_string(t)
          or (hasattr(pa.types, "is_string_view") and pa.types.is_string_view(t))):
        vals = pc.unique(arr.drop_null()) if len(arr) else arr
        yield [v for v in vals.to_pylist() if v]
    elif (pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)
          or (hasattr(pa.types, "is_binary_view") and pa.types.is_binary_view(t))):
        yield [v.decode("utf-8", "replace") for v in arr.drop_null().to_pylist() if v]
    elif pa.types.is_map(t):
        yield from _strings_of(arr.keys)
        yield from _strings_of(arr.items)
    elif (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
          or (hasattr(pa.types, "is_list_view") and pa.types.is_list_view(t))):
        yield from _strings_of(arr.flatten())
    elif pa.types.is_struct(t):
        for i in range(t.num_fields):
            yield from _strings_of(arr.field(i))
    elif pa.types.is_union(t):
        for i in range(t.num_fields):
            yield from _strings_of(arr.field(i))


def _field_names(t: Any, prefix: str = "") -> Iterator[str]:
    import pyarrow as pa

    if pa.types.is_struct(t) or pa.types.is_union(t):
        for i in range(t.num_fields):
            f = t.field(i)
            yield f.name
            yield from _field_names(f.type)
    elif pa.types.is_map(t):
        yield from _field_names(t.key_type)
        yield from _field_names(t.item_type)
    elif hasattr(t, "value_type") and not pa.types.is_dictionary(t):
        yield from _field_names(t.value_type)


def _parquet_tokens(data: bytes) -> list[str]:
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(data))
    tokens: list[str] = []

    def add(values: list[str]) -> None:
        if values:
            tokens.extend(_TOKEN_OR_SEP.findall(_SEP.join(values).lower()))
            tokens.append(_SEP)

    schema = table.schema
    names: list[str] = []
    for f in schema:
        names.append(f.name)
        names.extend(_field_names(f.type))
    add(names)
    for k, v in (schema.metadata or {}).items():
        add([k.decode("utf-8", "replace"), v.decode("utf-8", "replace")])
    for col in table.columns:
        for chunk in col.chunks:
            for values in _strings_of(chunk):
                add(values)
    return tokens


def _raw_tokens(data: bytes) -> list[str]:
    return _raw_tokens_decimals(data)[0]


def _raw_tokens_decimals(data: bytes) -> tuple[list[str], set[int]]:
    """The tokens of a raw file and the positions of those that are a part of a decimal number."""
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError):
            pass  # not really gzip: scan the bytes as they are
    text = data.decode("utf-8", "replace").lower()
    tokens: list[str] = []
    decimals: set[int] = set()
    n = len(text)
    for m in _TOKEN.finditer(text):
        a, b = m.span()
        if (a >= 2 and text[a - 1] == "." and text[a - 2].isdigit()) or \
                (b + 1 < n and text[b] == "." and text[b + 1].isdigit()):
            decimals.add(len(tokens))
        tokens.append(m.group())
    return tokens, decimals


def _is_parquet(data: bytes) -> bool:
    return len(data) >= 12 and data[:4] == _PARQUET_MAGIC and data[-4:] == _PARQUET_MAGIC


def _fingerprint(toks: tuple[str, ...]) -> str:
    return hashlib.sha256(" ".join(toks).encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------------------
# scan
# ------------------------------------------------------------------------------------------------
def leak_scan(
    file_uris: list[str],
    identifiers: Iterable[str],
    store: "Store",
    *,
    min_len: int = 4,
    fingerprints: bool = False,
    vocabulary: set[tuple[str, ...]] | None = None,
    common_words: bool = True,
) -> dict:
    """Scan ``file_uris`` for any of ``identifiers``.

    Returns ``{"clean", "complete", "files_scanned", "identifiers", "identifiers_skipped",
    "identifiers_unscanned", "unscanned_kinds", "identifiers_vocabulary", "hits"}`` where ``identifiers`` is
    the number of distinct (normalised) identifiers checked and each hit is ``{"file", "count" (distinct
    identifiers found), "occurrences", "kinds"}`` (plus ``"fingerprints"`` when asked). ``clean`` is
    ``False`` when there are hits, else ``None`` when some identifiers could not be scanned (short numbers
    or common words under ``min_len`` characters; ``complete`` is then false and ``unscanned_kinds`` counts
    them by kind), else ``True``. ``identifiers_skipped`` counts everything not searched (unscanned, and
    values without a letter or digit). Identifier values never appear in the result or the log. A file that
    cannot be read raises (the scan fails closed). One-word names that are common words, words of the
    product's own text (``common_words``) or of ``vocabulary`` (from :func:`public_vocabulary`) are not
    searched on their own; their number is ``identifiers_vocabulary``.
    """
    index = _build_index(identifiers, min_len, vocabulary, common_words)
    if index.unscanned:
        log.error("leak scan: %d identifier(s) of kind(s) %s are shorter than %d characters and only digits or "
                  "common words, so no text search can find them: the scan cannot say the files are clean",
                  sum(index.unscanned.values()), ", ".join(sorted(index.unscanned)), min_len)
    hits: list[dict[str, Any]] = []
    scanned = 0
    for uri in file_uris:
        data = store.read_bytes(uri)
        tokens: list[str] | None = None
        if _is_parquet(data):
            try:
                tokens = _parquet_tokens(data)
            except Exception as exc:  # corrupt / unreadable parquet: fall back to the raw bytes
                log.warning("leak scan: %s not readable as Parquet (%s); scanning raw bytes",
                            uri, type(exc).__name__)
        decimals: set[int] | None = None
        if tokens is None:
            tokens, decimals = _raw_tokens_decimals(data)
        scanned += 1
        found: Counter = Counter()
        _match(tokens, index, found, decimals)
        if found:
            kinds = sorted({k for toks in found for k in index.kinds.get(toks, {"unknown"})})
            hit: dict[str, Any] = {
                "file": uri,
                "count": len(found),
                "occurrences": int(sum(found.values())),
                "kinds": kinds,
            }
            if fingerprints:
                hit["fingerprints"] = sorted(_fingerprint(t) for t in found)
            hits.append(hit)
            log.warning("leak scan: %s contains %d real identifier(s) of kind(s) %s",
                        uri, len(found), ", ".join(kinds))
    complete = not index.unscanned
    result = {
        "clean": False if hits else (True if complete else None),
        "complete": complete,
        "files_scanned": scanned,
        "identifiers": index.checked,
        "identifiers_skipped": index.skipped,
        "identifiers_unscanned": sum(index.unscanned.values()),
        "unscanned_kinds": dict(sorted(index.unscanned.items())),
        "identifiers_vocabulary": index.vocabulary,
        "hits": hits,
    }
    log.info("leak scan: %d files, %d identifiers checked (%d skipped, %d of them unscannable, %d one-word names "
             "excused as common words), %d file(s) with hits", scanned, index.checked, index.skipped,
             sum(index.unscanned.values()), index.vocabulary, len(hits))
    return result
