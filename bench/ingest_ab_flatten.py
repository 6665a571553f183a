"""In one process, the hand-written Observation flattener of main (A, loaded from its file) against this
tree's (B), interleaved 12 times over the Observation lines of bench/ingest_bench.py's cached 100k extract;
process CPU seconds, best and median. Paths are this machine's (an ad hoc A/B for issue 19).

    PYTHONPATH=include .venv/bin/python bench/ingest_ab_flatten.py
"""
import importlib.util, time, orjson
from synthfactory.keys import Keyer
from synthfactory.fhir.normalize import fast_key
import synthfactory.ingest.flatteners as B
spec = importlib.util.spec_from_file_location("synthfactory.ingest.flat_main", "/work/main/include/synthfactory/ingest/flatteners.py")
A = importlib.util.module_from_spec(spec); spec.loader.exec_module(A)
src = "/work/wt-acct/bench/.cache/ingest/synthetic-s42-n100000/Observation.ndjson"
objs = [orjson.loads(l) for l in open(src, "rb")]
key = fast_key(Keyer(b"bench-salt-0123456789abcdef"))
fa = A.make_flatteners(key)["Observation"]; fb = B.make_flatteners(key)["Observation"]
def run(f):
    t = time.process_time()
    for o in objs:
        try: f(o, o["id"])
        except Exception: pass
    return time.process_time() - t
ta, tb = [], []
for i in range(12):
    ta.append(run(fa)); tb.append(run(fb))
print("main best %.3f median %.3f | acct best %.3f median %.3f | ratio best %.3f median %.3f" % (
    min(ta), sorted(ta)[6], min(tb), sorted(tb)[6], min(tb)/min(ta), sorted(tb)[6]/sorted(ta)[6]))
