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

__all__ = ["Identifier", "LeakMatcher", "load_identifiers", "leak_scan", "write_identifier_index", "tokenize", "infer_kind", "public_vocabulary"]

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
    """The token stream of a Parquet file: names, metadata, then every column's string values."""
    return [t for piece in _parquet_token_pieces(data) for t in piece]


def _schema_texts(schema: Any) -> Iterator[list[str]]:
    """The texts a Parquet file's schema carries, as cell lists: the column and nested field names, then each
    metadata key and value."""
    names: list[str] = []
    for f in schema:
        names.append(f.name)
        names.extend(_field_names(f.type))
    yield names
    for k, v in (schema.metadata or {}).items():
        yield [k.decode("utf-8", "replace"), v.decode("utf-8", "replace")]


def _parquet_token_pieces(data: bytes) -> Iterator[list[str]]:
    """:func:`_parquet_tokens` in consecutive pieces (one per list of values; the whole stream is never held)."""
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(data))
    pending: list[list[str]] = []

    def add(values: list[str]) -> None:
        if values:
            pending.append([*_TOKEN_OR_SEP.findall(_SEP.join(values).lower()), _SEP])

    for values in _schema_texts(table.schema):
        add(values)
    yield from pending
    for col in table.columns:
        for chunk in col.chunks:
            for values in _strings_of(chunk):
                pending.clear()
                add(values)
                yield from pending


#: rows per batch of pyarrow's dataset scanner, which ``pq.read_table`` uses: a row group is read in chunks of at
#: most this many rows from its start, and the scan reads the distinct values of each chunk
_SCAN_BATCH = 1 << 17


def _parquet_range_tokens(source: Any, start: int, stop: int) -> list[str]:
    """The tokens :func:`_parquet_tokens` gives row groups ``start``..``stop - 1`` of a Parquet file (the names and
    metadata only when ``start`` is 0), each row group read in the chunks ``pq.read_table`` reads it in. The order
    differs (row group by row group, not column by column) but every cell list ends with a separator, so the
    matched n-grams are the same."""
    import pyarrow.parquet as pq

    tokens: list[str] = []

    def add(values: list[str]) -> None:
        if values:
            tokens.extend(_TOKEN_OR_SEP.findall(_SEP.join(values).lower()))
            tokens.append(_SEP)

    with pq.ParquetFile(source) as pf:
        schema = pf.schema_arrow
        if start == 0:
            for values in _schema_texts(schema):
                add(values)
        for rg in range(start, stop):
            for batch in pf.iter_batches(batch_size=_SCAN_BATCH, row_groups=[rg], use_threads=False):
                for col in batch.columns:
                    for values in _strings_of(col):
                        add(values)
    return tokens


def parquet_row_groups(uri: str, store: "Store") -> list[int] | None:
    """The compressed size of each row group of a Parquet file (its footer only, for a local file), or None
    when the file is not Parquet or its footer is unreadable (the scan then reads it whole)."""
    import pyarrow.parquet as pq

    from synthfactory.storage import is_s3

    try:
        with store.open_read(uri) as fh:
            head = fh.read(4)
        if head != _PARQUET_MAGIC:
            return None
        with pq.ParquetFile(io.BytesIO(store.read_bytes(uri)) if is_s3(uri) else uri) as pf:
            md = pf.metadata
            return [md.row_group(i).total_byte_size for i in range(md.num_row_groups)]
    except Exception:  # not Parquet after all: one unit, scanned as the whole scan scans it
        return None


def _raw_tokens(data: bytes) -> list[str]:
    return _raw_tokens_decimals(data)[0]


def _raw_tokens_decimals(data: bytes) -> tuple[list[str], set[int]]:
    """The tokens of a raw file and the positions of those that are a part of a decimal number."""
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError):
            pass  # not really gzip: scan the bytes as they are
    return _text_tokens_decimals(data)


#: bytes of raw text tokenized at once by :func:`_raw_pieces`; tokens matched at once by ``_match_stream``
RAW_PIECE_BYTES = 8 << 20
MATCH_WINDOW_TOKENS = 1 << 20


def _raw_pieces(data: bytes, piece: int | None = None) -> Iterator[tuple[list[str], set[int]]]:
    """:func:`_raw_tokens_decimals` in consecutive pieces of about ``piece`` bytes, each cut just after a newline:
    a token never spans a newline and a decimal number's neighbours are the same characters, so the pieces
    concatenate (positions shifted) to the whole file's tokens and decimals. Gzip is decompressed as a stream
    once it is known to decompress (else the bytes are scanned as they are, as the whole-file read does)."""
    piece = piece or RAW_PIECE_BYTES
    stream: io.BufferedIOBase | io.BytesIO = io.BytesIO(data)
    if data[:2] == b"\x1f\x8b":
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(data)) as gz:
                while gz.read(piece):
                    pass
            stream = gzip.GzipFile(fileobj=io.BytesIO(data))
        except (OSError, EOFError):
            pass  # not really gzip: scan the bytes as they are
    rest = b""
    with stream:
        while True:
            block = stream.read(piece)
            buf = rest + block if rest else block
            if not block:
                if buf:
                    yield _text_tokens_decimals(buf)
                return
            cut = buf.rfind(b"\n") + 1
            if cut == 0:  # no newline yet: one long line, read on
                rest = buf
                continue
            rest = buf[cut:]
            yield _text_tokens_decimals(buf[:cut])


def _text_tokens_decimals(data: bytes) -> tuple[list[str], set[int]]:
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

def _log_unscanned(unscanned: Counter, min_len: int) -> None:
    if unscanned:
        log.error("leak scan: %d identifier(s) of kind(s) %s are shorter than %d characters and only digits or "
                  "common words, so no text search can find them: the scan cannot say the files are clean",
                  sum(unscanned.values()), ", ".join(sorted(unscanned)), min_len)


def _scan_result(hits: list[dict[str, Any]], scanned: int, checked: int, skipped: int, unscanned: Counter,
                 vocabulary: int) -> dict:
    """The leak scan's result (see :func:`leak_scan`), logged in one line without identifier values."""
    complete = not unscanned
    log.info("leak scan: %d files, %d identifiers checked (%d skipped, %d of them unscannable, %d one-word names "
             "excused as common words), %d file(s) with hits", scanned, checked, skipped,
             sum(unscanned.values()), vocabulary, len(hits))
    return {
        "clean": False if hits else (True if complete else None),
        "complete": complete,
        "files_scanned": scanned,
        "identifiers": checked,
        "identifiers_skipped": skipped,
        "identifiers_unscanned": sum(unscanned.values()),
        "unscanned_kinds": dict(sorted(unscanned.items())),
        "identifiers_vocabulary": vocabulary,
        "hits": hits,
    }

def _file_pieces(uri: str, store: "Store") -> Iterator[tuple[list[str], set[int] | None]]:
    """:func:`_file_tokens` in consecutive pieces (see :func:`_raw_pieces`, :func:`_parquet_token_pieces`)."""
    data = store.read_bytes(uri)
    if _is_parquet(data):
        pieces = _parquet_token_pieces(data)
        try:
            first = next(pieces)  # reads the table: where a corrupt file fails
        except StopIteration:
            return
        except Exception as exc:  # corrupt / unreadable parquet: fall back to the raw bytes
            log.warning("leak scan: %s not readable as Parquet (%s); scanning raw bytes", uri, type(exc).__name__)
        else:
            yield first, None
            yield from ((piece, None) for piece in pieces)
            return
    yield from _raw_pieces(data)


def _file_tokens(uri: str, store: "Store") -> tuple[list[str], set[int] | None]:
    """The token stream of one file (Parquet values cell by cell, else the raw text, with the positions of
    tokens that are a part of a decimal number); fails closed."""
    data = store.read_bytes(uri)
    if _is_parquet(data):
        try:
            return _parquet_tokens(data), None
        except Exception as exc:  # corrupt / unreadable parquet: fall back to the raw bytes
            log.warning("leak scan: %s not readable as Parquet (%s); scanning raw bytes", uri, type(exc).__name__)
    return _raw_tokens_decimals(data)


def leak_scan(
    file_uris: list[str],
    identifiers: "Iterable[str] | LeakMatcher",
    store: "Store",
    *,
    min_len: int = 4,
    fingerprints: bool = False,
    vocabulary: set[tuple[str, ...]] | None = None,
    common_words: bool = True,
) -> dict:
    """Scan ``file_uris`` for any of ``identifiers`` (or with a :class:`LeakMatcher` already built, which then
    carries ``min_len``, ``vocabulary`` and ``common_words``).

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
    matcher = identifiers if isinstance(identifiers, LeakMatcher) else LeakMatcher.from_identifiers(
        identifiers, min_len=min_len, vocabulary=vocabulary, common_words=common_words)
    return matcher.scan(file_uris, store, fingerprints=fingerprints, min_len=matcher.min_len)


def _leak_scan_reference(
    file_uris: list[str],
    identifiers: Iterable[str],
    store: "Store",
    *,
    min_len: int = 4,
    fingerprints: bool = False,
    vocabulary: set[tuple[str, ...]] | None = None,
    common_words: bool = True,
) -> dict:
    """The original implementation of :func:`leak_scan` (token-tuple dict, index built per call), kept as
    the reference the compact matcher is tested and benchmarked against (the same arguments and result).
    """
    index = _build_index(identifiers, min_len, vocabulary, common_words)
    _log_unscanned(index.unscanned, min_len)
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
    return _scan_result(hits, scanned, index.checked, index.skipped, index.unscanned, index.vocabulary)


# ------------------------------------------------------------------------------------------------
# compact identifier index and a matcher built once per task
# ------------------------------------------------------------------------------------------------
#: file name of the compact index beside ingest's identifiers.parquet
INDEX_SUFFIX = ".index.parquet"
#: identifiers at least this long (after stripping) are never "unscannable": the common-word check is
#: precomputed only below it, so ``min_len`` may not exceed it
_COMMON_MAX = 32
_INDEX_VERSION = "1"
_PY_WS = " \t\n\x0b\x0c\r\x1c\x1d\x1e\x1f"  # what str.strip() removes from an ASCII string
_BATCH = 262_144


def _salted_hash(values: Any, salt: str) -> Any:
    """uint64 keyed SipHash (pandas' ``hash_array``, 16-byte key ``salt``) of each string of ``values``."""
    import numpy as np
    import pandas as pd

    arr = values if isinstance(values, np.ndarray) else np.asarray(values, dtype=object)
    if not len(arr):
        return np.zeros(0, dtype=np.uint64)
    return pd.util.hash_array(arr.astype(object, copy=False), encoding="utf8", hash_key=salt, categorize=False)


def _index_schema() -> Any:
    import pyarrow as pa

    return pa.schema([
        pa.field("h", pa.uint64()),        # salted hash of the normalised token string ("amy jo ward")
        pa.field("first", pa.uint64()),    # salted hash of its first token
        pa.field("ntok", pa.int32()),      # number of tokens (0: no letter or digit)
        pa.field("kind", pa.string()),
        pa.field("slen", pa.int32()),      # length of the stripped value
        pa.field("common", pa.bool_()),    # only digits / common words (computed when slen < _COMMON_MAX)
        pa.field("row", pa.int64()),       # row of the value in its source (for fingerprints)
        pa.field("src", pa.int64()),       # -1: an identifier; else the entry index this variant belongs to
    ])


def _is_common(joined: str) -> bool:
    from synthfactory.privacy._words import COMMON_WORDS

    return all(t.isdigit() or t in COMMON_WORDS for t in joined.split(" "))


def _compact_batch(values: Any, kinds: Any, salt: str, row0: int, entry0: int) -> tuple[Any, Any]:
    """The index rows (identifiers, then their variants) of one batch of (value, kind) arrays (pyarrow)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    n = len(values)
    values = values.cast(pa.string()) if not pa.types.is_string(values.type) else values
    ascii_ = pc.fill_null(pc.string_is_ascii(values), True).to_numpy(zero_copy_only=False)
    low = pc.ascii_lower(values)
    joined_a = pc.utf8_trim(pc.replace_substring_regex(low, r"[^a-z0-9]+", " "), " ")
    slen_a = pc.utf8_length(pc.utf8_trim(values, _PY_WS))
    joined = joined_a.to_numpy(zero_copy_only=False).astype(object)
    slen = slen_a.to_numpy(zero_copy_only=False).astype(np.int32)
    kind = (kinds.to_numpy(zero_copy_only=False).astype(object) if kinds is not None
            else np.full(n, None, dtype=object))
    odd = np.nonzero(~ascii_)[0]
    if len(odd):  # non-ASCII values: Python's own lower() and \w, exactly as tokenize()
        pyvals = values.take(pa.array(odd)).to_pylist()
        for i, v in zip(odd, pyvals):
            joined[i] = " ".join(tokenize(v))
            slen[i] = len(v.strip())
    if kinds is None:
        nokind = list(range(n))
    else:
        nokind = np.nonzero(pc.fill_null(pc.equal(kinds.cast(pa.string()), ""), True).to_numpy(
            zero_copy_only=False))[0].tolist()
    if nokind:
        pyvals = values.take(pa.array(nokind, pa.int64())).to_pylist()
        for i, v in zip(nokind, pyvals):
            kind[i] = infer_kind(v)
    jarr = pa.array(joined, pa.string())
    ntok = np.where(pc.equal(jarr, "").to_numpy(zero_copy_only=False), 0,
                    pc.count_substring(jarr, " ").to_numpy(zero_copy_only=False) + 1).astype(np.int32)
    first = pc.list_element(pc.split_pattern(jarr, " ", max_splits=1), 0)
    common = np.zeros(n, dtype=bool)
    digits = pc.match_substring_regex(jarr, r"^[0-9 ]+$").to_numpy(zero_copy_only=False)
    common[digits] = True
    from synthfactory.privacy._words import COMMON_WORDS

    # a value is only digits / common words only if its first token is one (ASCII: [0-9]+ is isdigit())
    maybe = (pc.fill_null(pc.is_in(first, value_set=pa.array(sorted(COMMON_WORDS), pa.string())), False)
             .to_numpy(zero_copy_only=False)
             | pc.fill_null(pc.match_substring_regex(first, r"^[0-9]+$"), False).to_numpy(zero_copy_only=False))
    maybe[odd] = True  # non-ASCII: Python's isdigit() (fullwidth digits...) decides, below
    for i in np.nonzero((slen < _COMMON_MAX) & ~digits & (ntok > 0) & maybe)[0]:
        common[i] = _is_common(joined[i])
    h = _salted_hash(joined, salt)
    fh = _salted_hash(first.to_numpy(zero_copy_only=False).astype(object), salt)
    entries = {"h": h, "first": fh, "ntok": ntok, "kind": kind, "slen": slen, "common": common,
               "row": np.arange(row0, row0 + n, dtype=np.int64), "src": np.full(n, -1, dtype=np.int64)}
    # variants, in the order _build_index registers them: joined phone digits, then the name orders
    v_text: list[Any] = []
    v_src: list[Any] = []
    v_ntok: list[Any] = []
    ascii_multi = ascii_ & (ntok > 1)
    # all-digit multi-token values with >= 7 digits ("555 123 4567" -> "5551234567")
    phone = ascii_multi & digits
    if phone.any():
        idx = np.nonzero(phone)[0]
        glued = pc.replace_substring(jarr.take(pa.array(idx)), " ", "")
        cnt = pc.utf8_length(glued).to_numpy(zero_copy_only=False)
        keep = cnt >= 7
        v_text.append(glued.filter(pa.array(keep)).to_numpy(zero_copy_only=False).astype(object))
        v_src.append(idx[keep])
        v_ntok.append(np.ones(int(keep.sum()), dtype=np.int32))
    is_name = pc.is_in(pa.array(kind, pa.string()), value_set=pa.array(sorted(_NAME_KINDS))).to_numpy(
        zero_copy_only=False)
    name2 = ascii_multi & is_name
    if name2.any():
        idx = np.nonzero(name2)[0]
        sub = jarr.take(pa.array(idx))
        v_text.append(pc.replace_substring_regex(sub, r"^(.*) ([^ ]+)$", r"\2 \1").to_numpy(
            zero_copy_only=False).astype(object))
        v_src.append(idx)
        v_ntok.append(ntok[idx])
        idx3 = np.nonzero(ascii_multi & is_name & (ntok > 2))[0]
        if len(idx3):
            sub = jarr.take(pa.array(idx3))
            for rep in (r"\1 \2", r"\2 \1"):
                v_text.append(pc.replace_substring_regex(sub, r"^([^ ]+) .* ([^ ]+)$", rep).to_numpy(
                    zero_copy_only=False).astype(object))
                v_src.append(idx3)
                v_ntok.append(np.full(len(idx3), 2, dtype=np.int32))
    for i in odd:  # non-ASCII: Python's isdigit(), as _build_index
        if ntok[i] < 2:
            continue
        toks = joined[i].split(" ")
        if all(t.isdigit() for t in toks) and sum(map(len, toks)) >= 7:
            v_text.append(np.array(["".join(toks)], dtype=object))
            v_src.append(np.array([i]))
            v_ntok.append(np.ones(1, dtype=np.int32))
        if kind[i] in _NAME_KINDS:
            vs = [(toks[-1], *toks[:-1])]
            if len(toks) > 2:
                vs += [(toks[0], toks[-1]), (toks[-1], toks[0])]
            for v in vs:
                v_text.append(np.array([" ".join(v)], dtype=object))
                v_src.append(np.array([i]))
                v_ntok.append(np.array([len(v)], dtype=np.int32))
    if v_text:
        vt = np.concatenate(v_text)
        vs = np.concatenate(v_src).astype(np.int64)
        vn = np.concatenate(v_ntok)
        order = np.argsort(vs, kind="stable")  # by source row; per row in registration order
        vt, vs, vn = vt[order], vs[order], vn[order]
        vfirst = pc.list_element(pc.split_pattern(pa.array(vt, pa.string()), " ", max_splits=1), 0)
        variants = {"h": _salted_hash(vt, salt),
                    "first": _salted_hash(vfirst.to_numpy(zero_copy_only=False).astype(object), salt),
                    "ntok": vn, "kind": kind[vs], "slen": slen[vs], "common": common[vs],
                    "row": vs + row0, "src": vs + entry0}
    else:
        variants = None
    return entries, variants


def _to_table(cols: dict) -> Any:
    import pyarrow as pa

    schema = _index_schema()
    return pa.table({f.name: pa.array(cols[f.name], f.type) for f in schema}, schema=schema)


def compact_identifiers(values: Any, kinds: Any, salt: str, *, row0: int = 0, dedup: bool = False) -> Any:
    """The compact index (a pyarrow Table, see :func:`_index_schema`) of the identifier ``values`` (a pyarrow
    string array) and their ``kinds`` (a string array or None: inferred from the shape): per identifier the
    salted hashes of its normalised token string and of its first token, its token count, kind, stripped
    length, whether it is only digits / common words, and one row per match variant (joined phone digits,
    name orders) pointing at its identifier. ``dedup`` drops repeated (value, kind) pairs (first kept)."""
    import numpy as np
    import pyarrow as pa

    values = pa.array(values, pa.string()) if not isinstance(values, (pa.Array, pa.ChunkedArray)) else values
    # never one array of the whole column: 2M patients' 75M identifiers are ~2.8 GB of text, past the 2 GiB that a
    # string array's 32-bit offsets address ("offset overflow" in a 2M-patient run); each batch is combined alone
    if isinstance(values, pa.Array):
        values = pa.chunked_array([values])
    if kinds is not None and isinstance(kinds, pa.Array):
        kinds = pa.chunked_array([kinds])
    keep = values.is_valid()
    if not pa.compute.all(keep).as_py():
        values, kinds = values.filter(keep), (kinds.filter(keep) if kinds is not None else None)
    rows = np.arange(row0, row0 + len(values), dtype=np.int64)
    kept = None  # positions of the entries kept by dedup, in order (None: every one)
    if dedup and len(values):
        parts = []
        for start in range(0, len(values), _BATCH):  # batch by batch: never all values as Python strings
            k = _salted_hash(values.slice(start, _BATCH).to_numpy().astype(object), salt)
            if kinds is not None:
                k = k ^ (_salted_hash(kinds.slice(start, _BATCH).fill_null("\x00").to_numpy().astype(object), salt)
                         * np.uint64(0x9E3779B97F4A7C15))
            parts.append(k)
        key = np.concatenate(parts)
        _, first_at = np.unique(key, return_index=True)
        first_at.sort()
        if len(first_at) < len(values):
            kept = first_at
            rows = rows[first_at]

    def batch(arr: Any, start: int) -> Any:
        """Entries start .. start + _BATCH (of the kept ones) as one array, taken from their own range only."""
        if arr is None:
            return None
        if kept is None:
            return arr.slice(start, _BATCH).combine_chunks()
        idx = kept[start:start + _BATCH]
        lo = int(idx[0])
        return arr.slice(lo, int(idx[-1]) + 1 - lo).combine_chunks().take(pa.array(idx - lo))

    parts_e, parts_v = [], []
    for start in range(0, len(rows), _BATCH):
        e, v = _compact_batch(batch(values, start), batch(kinds, start), salt, 0, start)
        e["row"] = rows[start:start + len(e["h"])]
        parts_e.append(_to_table(e))
        if v is not None:
            v["row"] = rows[v["src"]]
            parts_v.append(_to_table(v))
    if not parts_e:
        return _index_schema().empty_table()
    return pa.concat_tables(parts_e + parts_v)


def _index_arrays(parts: list) -> dict[str, Any]:
    """The compact index's columns as numpy arrays, the tables of ``parts`` one after another: converted column by
    column, so the caller can drop the Arrow tables before the matcher builds its own arrays (a column read in
    several row groups is copied by ``to_numpy`` anyway; holding the table besides doubled the index in memory).
    ``kcode`` / ``kind_names``: the kinds dictionary-encoded in order of first appearance."""
    import numpy as np
    import pyarrow as pa

    parts = [p for p in parts if p.num_rows] or parts[:1]
    out: dict[str, Any] = {}
    for name in ("h", "first", "ntok", "slen", "common", "row", "src"):
        cols = [p.column(name).to_numpy() for p in parts]
        out[name] = cols[0] if len(cols) == 1 else np.concatenate(cols)
        del cols
    kind = pa.chunked_array([c for p in parts for c in p.column("kind").cast(pa.string()).chunks],
                            type=pa.string()).combine_chunks().dictionary_encode()
    out["kcode"] = kind.indices.to_numpy(zero_copy_only=False)
    out["kind_names"] = kind.dictionary.to_pylist()
    return out


def _read_index(uri: str, store: "Store") -> Any:
    import pyarrow.parquet as pq

    from synthfactory.storage import is_s3

    with pq.ParquetFile(io.BytesIO(store.read_bytes(uri)) if is_s3(uri) else uri) as pf:
        return pf.read()


def _sha256_of(uri: str, store: "Store") -> str:
    h = hashlib.sha256()
    with store.open_read(uri) as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def identifier_index_uri(identifiers_uri: str) -> str:
    return identifiers_uri[:-len(".parquet")] + INDEX_SUFFIX if identifiers_uri.endswith(".parquet") \
        else identifiers_uri + INDEX_SUFFIX


def write_identifier_index(identifiers_uri: str, store: "Store") -> str:
    """Build the compact index of ingest's ``identifiers.parquet`` (read batch by batch) and write it beside it
    (``identifiers.index.parquet``, with its random salt and the source's sha256 in the file metadata).
    Returns its URI. Done once per ingest; :meth:`LeakMatcher.for_ingest` reuses it."""
    import secrets

    import pyarrow as pa
    import pyarrow.parquet as pq

    from synthfactory.storage import is_s3

    data = store.read_bytes(identifiers_uri) if is_s3(identifiers_uri) else None
    source = io.BytesIO(data) if data is not None else identifiers_uri
    digest = _sha256_of(identifiers_uri, store)
    salt = secrets.token_hex(8)  # 16 characters: the SipHash key
    with pq.ParquetFile(source) as pf:
        names = pf.schema_arrow.names
        if "value" not in names:
            raise ValueError(f"{identifiers_uri}: identifiers file has no 'value' column")
        cols = ["value", "kind"] if "kind" in names else ["value"]
        table = pf.read(columns=cols)
    values = table.column("value")
    if not pa.types.is_string(values.type):
        values = pa.array([None if v is None else (v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v))
                           for v in values.to_pylist()], pa.string())
    kinds = table.column("kind").cast(pa.string()) if "kind" in cols else None
    del table
    index = compact_identifiers(values, kinds, salt, dedup=True)
    index = index.replace_schema_metadata({b"salt": salt.encode(), b"source_sha256": digest.encode(),
                                           b"version": _INDEX_VERSION.encode()})
    uri = identifier_index_uri(identifiers_uri)
    buf = io.BytesIO()
    pq.write_table(index, buf, compression="zstd")
    store.write_bytes(uri, buf.getvalue())
    log.info("identifier index: %d entries written to %s", index.num_rows, uri)
    return uri


def _run_starts(a: Any) -> Any:
    """Positions where a sorted array's runs of equal values begin (np.unique's return_index on sorted input)."""
    import numpy as np

    if not len(a):
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.concatenate([[True], a[1:] != a[:-1]]))


def _in_sorted(a: Any, sorted_unique: Any) -> Any:
    """``np.isin(a, sorted_unique)`` by binary search (no sorted copy of the large array)."""
    import numpy as np

    if not len(sorted_unique) or not len(a):
        return np.zeros(len(a), dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_unique, a), len(sorted_unique) - 1)
    return sorted_unique[pos] == a


class LeakMatcher:
    """The leak scan's matcher, built once per task from the compact index and reused for every file (and the
    data card): sorted arrays of salted 64-bit hashes of identifier token strings, their canonical identifier,
    and, per first-token hash, a bit mask of the n-gram lengths to try. It matches exactly what
    :func:`_build_index` / :func:`_match` match (a hash collision, about 1 in 2**64 per lookup, could only add a
    hit, never lose one)."""

    def __init__(self, index: Any, salt: str, *, min_len: int = 4, vocabulary: set[tuple[str, ...]] | None = None,
                 common_words: bool = True, texts: Any = None) -> None:
        import numpy as np

        if min_len > _COMMON_MAX:
            raise ValueError(f"leak scan: min_len may not exceed {_COMMON_MAX}")
        self.salt = salt
        self.min_len = min_len
        self._texts = texts  # callable(rows) -> values, for fingerprints
        a = index if isinstance(index, dict) else _index_arrays([index])  # a Table, or its arrays (for_ingest)
        h, first, ntok, slen, common, row, src = (a[k] for k in ("h", "first", "ntok", "slen", "common", "row", "src"))
        kcode = a["kcode"]
        self.kind_names = a["kind_names"]
        del a
        is_e = src < 0
        word_kind = np.isin(kcode, [i for i, k in enumerate(self.kind_names) if k in _WORD_KINDS])
        excuse = _salted_hash(np.array(sorted(_excuse_words(vocabulary, common_words)), dtype=object), salt)
        valid = is_e & (ntok > 0)
        # bounded transients (one identifier list of millions): membership is tested only where it can hold, and
        # against sorted arrays by binary search (np.isin would sort copies of the whole list)
        maybe = np.flatnonzero(valid & (ntok == 1) & word_kind)
        excused = np.zeros(len(h), dtype=bool)
        excused[maybe] = np.isin(h[maybe], excuse)
        unsc = valid & ~excused & (slen < min_len) & common
        active = valid & ~excused & ~unsc
        # counts exactly as _build_index reports them
        self.unscanned = Counter({self.kind_names[c]: int(n) for c, n in zip(*np.unique(kcode[unsc], return_counts=True))})
        del maybe, slen, common, word_kind, valid  # each input array is dropped once the last step that reads it is done
        # per own hash: its kinds (sorted by hash) and a source row (for fingerprints)
        h_active = h[active]
        order = np.argsort(h_active, kind="stable")
        self._kh = h_active[order]
        del h_active
        self._kc = kcode[active][order]
        self._krow = row[active][order]
        del order, kcode, row
        own = self._kh[_run_starts(self._kh)]  # np.unique(h[active]): the sorted hashes, once each
        self.checked = int(len(own))
        self.skipped = int((is_e & (ntok == 0)).sum() + unsc.sum())
        excused_h = np.unique(h[excused])
        self.vocabulary = int((~_in_sorted(excused_h, own)).sum())
        del excused, excused_h, unsc
        # variants of active identifiers, first registered wins, never over an identifier's own string
        entry_idx = np.nonzero(is_e)[0]
        e_active = np.zeros(int(is_e.sum()), dtype=bool)
        e_active[:] = active[entry_idx]
        v = ~is_e
        vsrc = src[v]
        del src
        vok = e_active[vsrc]
        vh, vfirst, vn, vsrc = h[v][vok], first[v][vok], ntok[v][vok], vsrc[vok]
        del v, vok
        notown = ~_in_sorted(vh, own)
        vh, vfirst, vn, vsrc = vh[notown], vfirst[notown], vn[notown], vsrc[notown]
        ukeys, at = np.unique(vh, return_index=True)  # vh is in registration order: return_index = first
        canon_v = h[entry_idx[vsrc[at]]]
        del entry_idx, e_active, h, vh, vsrc, at, notown, is_e
        keys = np.concatenate([own, ukeys])
        canon = np.concatenate([own, canon_v])
        del own
        o = np.argsort(keys)
        self._keys, self._canon = keys[o], canon[o]
        del keys, canon, o
        # first-token hash -> bit mask of n-gram lengths (lengths >= 64 kept aside)
        sf = np.concatenate([first[active], vfirst])
        del first, vfirst
        sn = np.concatenate([ntok[active], vn]).astype(np.int64)
        del ntok, vn, active
        long_ = sn >= 64
        self._long: dict[int, set[int]] = defaultdict(set)
        for f, n in zip(sf[long_], sn[long_]):
            self._long[int(f)].add(int(n))
        sf, sn = sf[~long_], sn[~long_]
        bits = np.left_shift(np.uint64(1), sn.astype(np.uint64))
        del sn, long_
        o = np.argsort(sf, kind="stable")
        sf, bits = sf[o], bits[o]
        del o
        at = _run_starts(sf)  # np.unique(sf, return_index=True) of the sorted sf
        self._starts = sf[at]
        self._masks = np.bitwise_or.reduceat(bits, at) if len(at) else np.zeros(0, dtype=np.uint64)
        del sf, bits, at
        if self._long:
            extra = np.array(sorted(self._long), dtype=np.uint64)
            allst = np.union1d(self._starts, extra)
            masks = np.zeros(len(allst), dtype=np.uint64)
            masks[np.searchsorted(allst, self._starts)] = self._masks
            self._starts, self._masks = allst, masks
        lens = set()
        m = int(np.bitwise_or.reduce(self._masks)) if len(self._masks) else 0
        for n in range(64):
            if m >> n & 1:
                lens.add(n)
        for ns in self._long.values():
            lens |= ns
        self._lengths = sorted(lens)

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_identifiers(cls, identifiers: Iterable[str], **kw: Any) -> "LeakMatcher":
        """From an iterable of identifiers (``str`` or :class:`Identifier`, ``None`` skipped), as
        :func:`leak_scan` takes them."""
        import secrets

        import pyarrow as pa

        vals, kinds = [], []
        for ident in identifiers:
            if ident is None:
                continue
            vals.append(str(ident))
            kinds.append(getattr(ident, "kind", None))
        salt = secrets.token_hex(8)
        index = compact_identifiers(pa.array(vals, pa.string()), pa.array(kinds, pa.string()), salt)
        return cls(index, salt, texts=lambda rows: [vals[r] for r in rows], **kw)

    @classmethod
    def for_ingest(cls, identifiers_uri: str, store: "Store", extra: Iterable[str] = (), **kw: Any) -> "LeakMatcher":
        """From ingest's identifier list (its compact index, built and written beside it when missing or stale)
        plus ``extra`` identifiers (the real HMAC keys)."""
        import pyarrow as pa

        idx_uri = identifier_index_uri(identifiers_uri)
        index = None
        if store.exists(idx_uri):
            index = _read_index(idx_uri, store)
            meta = index.schema.metadata or {}
            digest = _sha256_of(identifiers_uri, store)
            if meta.get(b"source_sha256", b"").decode() != digest or meta.get(b"version") != _INDEX_VERSION.encode():
                index = None
        if index is None:
            write_identifier_index(identifiers_uri, store)
            index = _read_index(idx_uri, store)
        salt = index.schema.metadata[b"salt"].decode()
        n_src = int(pa.compute.max(index.column("row")).as_py()) + 1 if index.num_rows else 0
        extra = [str(v) for v in extra if v is not None]
        if extra:
            more = compact_identifiers(pa.array(extra, pa.string()), None, salt, row0=n_src)
            src = more.column("src").to_numpy()
            isrc = index.column("src").to_numpy()
            n_e = int((isrc < 0).sum())
            # variant rows point at entries: shift past the identifiers' entries... and keep entries first
            more_e = more.filter(pa.array(src < 0))
            more_v = more.filter(pa.array(src >= 0))
            if (isrc[:n_e] < 0).all():  # entries first (as written): zero-copy slices, not copies of the index
                base_e, base_v = index.slice(0, n_e), index.slice(n_e)
            else:
                base_e, base_v = index.filter(pa.array(isrc < 0)), index.filter(pa.array(isrc >= 0))
            del isrc
            if base_e.schema.equals(_index_schema()):  # no cast (a cast copies every column)
                base_e, base_v = base_e.replace_schema_metadata(None), base_v.replace_schema_metadata(None)
            if more_v.num_rows:
                more_v = more_v.set_column(more_v.schema.get_field_index("src"), "src",
                                           pa.array(more_v.column("src").to_numpy() + n_e, pa.int64()))
            parts = [base_e, more_e, base_v, more_v]
            del more, more_e, more_v, base_e, base_v, src
        else:
            parts = [index]
        arrays = _index_arrays(parts)  # numpy, column by column; then the Arrow index is dropped before the build
        del parts, index

        def texts(rows: list[int]) -> list[str]:
            import pyarrow.parquet as pq

            values = pq.read_table(io.BytesIO(store.read_bytes(identifiers_uri)), columns=["value"]).column("value")
            return [values[r].as_py() if r < n_src else extra[r - n_src] for r in rows]

        return cls(arrays, salt, texts=texts, **kw)

    # -- matching ----------------------------------------------------------------------------------
    def _match(self, tokens: list[str], decimals: set[int] | None = None, stop: int | None = None) -> Counter:
        """Canonical identifier hash -> occurrences in ``tokens`` (as :func:`_match`, ``decimals`` included);
        with ``stop``, only the n-grams that start before it."""
        import numpy as np

        found: Counter = Counter()
        n_tok = len(tokens)
        if not n_tok or not len(self._starts):
            return found
        th = _salted_hash(np.array(tokens, dtype=object), self.salt)
        pos = np.searchsorted(self._starts, th)
        pos[pos >= len(self._starts)] = 0
        ok = self._starts[pos] == th
        if stop is not None:
            ok[max(0, stop):] = False
        cand = np.nonzero(ok)[0]
        if not len(cand):
            return found
        masks = self._masks[pos[cand]]
        keys, canon = self._keys, self._canon
        for n in self._lengths:
            if n < 64:
                sel = cand[((masks >> np.uint64(n)) & np.uint64(1)).astype(bool) & (cand + n <= n_tok)]
            else:
                sel = np.array([i for i in cand if n in self._long.get(int(th[i]), ()) and i + n <= n_tok],
                               dtype=np.int64)
            if not len(sel):
                continue
            gh = th[sel] if n == 1 else _salted_hash(
                np.array([" ".join(tokens[i:i + n]) for i in sel], dtype=object), self.salt)
            p = np.searchsorted(keys, gh)
            p[p >= len(keys)] = 0
            hit = keys[p] == gh
            if not hit.any():
                continue
            hashes = canon[p[hit]].tolist()
            if n == 1 and decimals:  # a digits-only table id inside a decimal number is a figure, not an id
                hashes = [h for i, h in zip(sel[hit].tolist(), hashes)
                          if not (i in decimals and tokens[i].isdigit() and self._kinds(h) <= _NUMBER_ID_KINDS)]
            found.update(hashes)
        return found

    def _match_stream(self, pieces: Iterable[tuple[list[str], set[int] | None]],
                      window: int | None = None) -> Counter:
        """:meth:`_match` over the concatenation of ``pieces`` (tokens, decimal positions), exactly, holding about
        ``window`` tokens at a time: each window counts the n-grams that start before its last ``L - 1`` tokens
        (L = the longest identifier in tokens), which carry over to the next window, where they start."""
        found: Counter = Counter()
        window = window or MATCH_WINDOW_TOKENS
        keep = max(self._lengths, default=1) - 1
        toks: list[str] = []
        decs: set[int] = set()
        for piece, dec in pieces:
            if dec:
                decs.update(i + len(toks) for i in dec)
            toks.extend(piece)
            if len(toks) < window + keep:
                continue
            stop = len(toks) - keep
            found.update(self._match(toks, decs, stop=stop))
            toks = toks[stop:]
            decs = {i - stop for i in decs if i >= stop}
        if toks:
            found.update(self._match(toks, decs))
        return found

    def _kinds(self, h: int) -> set[str]:
        import numpy as np

        lo, hi = np.searchsorted(self._kh, np.uint64(h), "left"), np.searchsorted(self._kh, np.uint64(h), "right")
        return {self.kind_names[c] for c in self._kc[lo:hi]} or {"unknown"}

    def _fingerprints(self, found: Iterable[int]) -> list[str]:
        import numpy as np

        rows = [int(self._krow[np.searchsorted(self._kh, np.uint64(h))]) for h in found]
        texts = self._texts(rows) if self._texts else []
        return sorted(_fingerprint(tuple(tokenize(t))) for t in texts)

    def match_file(self, uri: str, store: "Store", row_groups: tuple[int, int] | None = None) -> tuple[Counter, bool]:
        """Canonical identifier hash -> occurrences in one file, as :meth:`scan` counts them; with ``row_groups``
        (``(start, stop)``) only those row groups of a Parquet file (its column names and metadata with the range
        that starts at 0), read in the chunks the whole-file read gives them, so the parts of a file add up to
        the whole file's counts. The second value is False when that range could not be read as Parquet and the
        whole file was scanned as raw bytes instead (what :meth:`scan` does with the whole file)."""
        if row_groups is None:  # streamed: a file's whole token list is never held (a 318 MB NDJSON held GBs)
            return self._match_stream(_file_pieces(uri, store)), True
        from synthfactory.storage import is_s3

        try:  # a local file is read from disk row group by row group, an S3 object whole
            tokens = _parquet_range_tokens(io.BytesIO(store.read_bytes(uri)) if is_s3(uri) else uri, *row_groups)
        except Exception as exc:  # as _file_tokens: an unreadable Parquet file is scanned as raw bytes, whole
            log.warning("leak scan: %s not readable as Parquet (%s); scanning raw bytes", uri, type(exc).__name__)
            return self._match_stream(_raw_pieces(store.read_bytes(uri))), False
        return self._match(tokens), True

    def hit(self, uri: str, found: Counter, *, fingerprints: bool = False) -> dict[str, Any]:
        """The result's hit of one file (counts and kinds, never values), logged."""
        kinds = sorted({k for h in found for k in self._kinds(h)})
        hit: dict[str, Any] = {"file": uri, "count": len(found), "occurrences": int(sum(found.values())),
                               "kinds": kinds}
        if fingerprints:
            hit["fingerprints"] = self._fingerprints(found)
        log.warning("leak scan: %s contains %d real identifier(s) of kind(s) %s", uri, len(found), ", ".join(kinds))
        return hit

    def result(self, hits: list[dict[str, Any]], scanned: int) -> dict:
        """:func:`leak_scan`'s result of ``scanned`` files with these ``hits``."""
        return _scan_result(hits, scanned, self.checked, self.skipped, self.unscanned, self.vocabulary)

    def scan(self, file_uris: list[str], store: "Store", *, fingerprints: bool = False, min_len: int = 4) -> dict:
        """Scan ``file_uris``: the result of :func:`leak_scan`."""
        _log_unscanned(self.unscanned, min_len)
        hits: list[dict[str, Any]] = []
        scanned = 0
        for uri in file_uris:
            found, _ = self.match_file(uri, store)
            scanned += 1
            if found:
                hits.append(self.hit(uri, found, fingerprints=fingerprints))
        return self.result(hits, scanned)


# ------------------------------------------------------------------------------------------------
# the scan in parts (the DAG maps one task over each): plan, part, merge
# ------------------------------------------------------------------------------------------------
def plan_scan(file_uris: list[str], store: "Store", n: int) -> list[dict]:
    """Cut the scan of ``file_uris`` into about ``n`` work units (JSON-able, no content): ``{"index", "file",
    "file_index", "row_groups"}``. Every file is at least one unit (``row_groups`` None: read whole); a Parquet file
    of several row groups whose row-group bytes exceed ``1/n`` of all Parquet bytes is cut into contiguous
    row-group ranges ``[start, stop)`` of about ``1/n`` each. Deterministic."""
    sizes = [parquet_row_groups(uri, store) for uri in file_uris]
    total = sum(sum(s) for s in sizes if s)
    per = total / max(1, n)
    units: list[dict] = []
    for i, (uri, rgs) in enumerate(zip(file_uris, sizes)):
        k = min(len(rgs), max(1, round(sum(rgs) / per))) if rgs and len(rgs) > 1 and per > 0 else 1
        if k == 1:
            units.append({"index": len(units), "file": uri, "file_index": i, "row_groups": None})
            continue
        cum = [0]
        for b in rgs:
            cum.append(cum[-1] + b)
        cuts = [0]
        for j in range(1, k):  # each cut at the row-group boundary nearest j/k of the bytes, ranges never empty
            target = cum[-1] * j / k
            at = min(range(cuts[-1] + 1, len(rgs) - (k - j) + 1), key=lambda i: abs(cum[i] - target))
            cuts.append(at)
        cuts.append(len(rgs))
        for a, b in zip(cuts, cuts[1:]):
            units.append({"index": len(units), "file": uri, "file_index": i, "row_groups": [a, b]})
    return units


def scan_part(matcher: LeakMatcher, unit: dict, store: "Store", matched_uri: str) -> dict:
    """Scan one unit of :func:`plan_scan`. Returns counts only (the unit, ``hit``: the unit's hit as
    :func:`leak_scan` reports one, or None; the matcher's identifier counts; ``raw``: the range was not readable
    as Parquet and the whole file was scanned as raw bytes). A row-group range with hits also writes the salted
    hashes of the identifiers it matched to ``matched_uri`` (staging, beside the identifier index; never the
    task's result) so that the merge can count the file's *distinct* identifiers."""
    rg = tuple(unit["row_groups"]) if unit.get("row_groups") else None
    found, parquet = matcher.match_file(unit["file"], store, rg)  # type: ignore[arg-type]
    part = {**unit, "raw": not parquet, "hit": matcher.hit(unit["file"], found) if found else None,
            "matched_uri": None, "identifiers": matcher.checked, "identifiers_skipped": matcher.skipped,
            "unscanned_kinds": dict(sorted(matcher.unscanned.items())),
            "identifiers_vocabulary": matcher.vocabulary}
    if found and rg is not None and parquet:
        store.write_json(matched_uri, {"matched": [str(h) for h in sorted(found)],
                                       "occurrences": int(sum(found.values()))})
        part["matched_uri"] = matched_uri
    return part


def merge_scan(file_uris: list[str], parts: list[dict], store: "Store", *, min_len: int = 4) -> dict:
    """The result :func:`leak_scan` gives ``file_uris`` in one process, from the :func:`scan_part` results of
    every unit of :func:`plan_scan`: a file's hit is its only unit's, or, for a file cut into row-group ranges, the
    union of the ranges' matched identifiers (distinct count), the sum of their occurrences and the union of
    their kinds (a range that fell back to the raw bytes scanned the whole file: its hit is the file's). Fails
    (ValueError) on a missing unit or parts built from different identifier lists."""
    by_file: dict[int, list[dict]] = defaultdict(list)
    for p in parts:
        by_file[int(p["file_index"])].append(p)
    counts = {(p["identifiers"], p["identifiers_skipped"], tuple(sorted(p["unscanned_kinds"].items())),
               p["identifiers_vocabulary"]) for p in parts}
    if len(counts) != 1:
        raise ValueError(f"leak scan: {len(parts)} parts disagree on the identifier list ({len(counts)} variants)")
    hits: list[dict[str, Any]] = []
    for i, uri in enumerate(file_uris):
        ps = sorted(by_file.get(i, []), key=lambda p: p["index"])
        if not ps or ps[0]["file"] != uri:
            raise ValueError(f"leak scan: no scanned part of file {i} ({uri})")
        ranges = [p["row_groups"] for p in ps]
        if len(ps) > 1 and (any(r is None for r in ranges) or ranges[0][0] != 0
                            or any(a[1] != b[0] for a, b in zip(ranges, ranges[1:]))):
            raise ValueError(f"leak scan: the parts of {uri} do not cover its row groups in order")
        raw = [p for p in ps if p["raw"]]
        if raw or len(ps) == 1:
            hit = (raw or ps)[0]["hit"]
        else:
            with_hits = [p for p in ps if p["hit"]]
            matched: set[int] = set()
            for p in with_hits:
                matched.update(int(h) for h in store.read_json(p["matched_uri"])["matched"])
            hit = {"file": uri, "count": len(matched),
                   "occurrences": int(sum(p["hit"]["occurrences"] for p in with_hits)),
                   "kinds": sorted({k for p in with_hits for k in p["hit"]["kinds"]})} if with_hits else None
        if hit:
            hits.append(hit)
    checked, skipped, unscanned, vocabulary = counts.pop()
    _log_unscanned(Counter(dict(unscanned)), min_len)
    return _scan_result(hits, len(file_uris), checked, skipped, Counter(dict(unscanned)), vocabulary)
