"""A longer differential fuzz of the compiled flatten than the test suite runs (not collected by pytest).

    .venv/bin/python tests/ingest/fuzz_native.py 25        # 25 seeds x 10,000-10,500 lines (6 types), 60 % mutated

Each seed writes an extract with test_native's generators, ingests it with and without the compiled
flatten and compares every output (test_native.ingest_both); it prints the quarantine reasons reached.
Under AddressSanitizer and UBSan (rebuild the module with them first, rebuild it plainly afterwards):

    CFLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -O1" \\
        .venv/bin/python setup.py build_ext --inplace --force
    LD_PRELOAD=$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so) \\
        ASAN_OPTIONS=detect_leaks=0 .venv/bin/python tests/ingest/fuzz_native.py 10
    rm -rf build && .venv/bin/python setup.py build_ext --inplace --force
"""

from __future__ import annotations

import collections
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_native as T  # noqa: E402

from synthfactory.keys import Keyer  # noqa: E402


def main(seeds: int) -> None:
    keyer = Keyer(b"fuzz-salt-0123456789abcdef")
    native = quarantined = 0
    reasons: collections.Counter = collections.Counter()
    for seed in range(100, 100 + seeds):
        d = Path(tempfile.mkdtemp())
        try:
            # odd seeds: generated (and mutated) Patients too; even seeds: the fixed plain ones (fewer dangling lines)
            types = ("Patient", *T.ALL5) if seed % 2 else T.ALL5
            T.write_extract(d / "src", seed=seed, n=2000, mutated=0.6, types=types)
            rep, _ = T.ingest_both(d / "src", d, keyer, validate_first=3, validate_sample_rate=0.02, batch_rows=211,
                                   resources=["Patient", *T.ALL5])
            native += sum(rep["native_lines"].values())
            quarantined += rep["quarantined_total"]
            for per in rep["quarantine_reasons"].values():
                reasons.update(per)
        finally:
            shutil.rmtree(d)
    print(f"{seeds} seeds: outputs equal; {native} lines taken natively, {quarantined} quarantined")
    for reason, n in reasons.most_common():
        print(f"{n:8d}  {reason}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
