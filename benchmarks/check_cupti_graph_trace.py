"""When CUPTI's graph-level trace (cupti-python) may be turned on around torch CUDA graphs, on a GPU:

    python benchmarks/check_cupti_graph_trace.py early|split|late

early: every activity kind enabled before the graph is captured; split: GRAPH_TRACE before, the kinds for work
outside graphs after (what worker/cupti_timeline.py does); late: every kind after. On one H200 (driver 580,
CUDA 13.0, cupti-python 13.0.1) early and split trace each replay as one record, and late crashes the next
replay (a segmentation fault). cupti-python must match the driver's CUDA: 13.2 crashed on this driver too.
"""
import sys
import time
from collections import Counter

import torch

from cupti import cupti

mode = sys.argv[1]
records = []
K = cupti.ActivityKind
EAGER = (K.CONCURRENT_KERNEL, K.MEMCPY, K.MEMSET)


def requested():
    return 8 << 20, 0


def completed(activities):
    for a in activities:
        records.append((int(a.kind), a.start, a.end, getattr(a, "name", "") or "", getattr(a, "graph_id", 0)))


if mode in ("early", "split"):
    cupti.activity_enable(K.GRAPH_TRACE)
    if mode == "early":
        for kind in EAGER:
            cupti.activity_enable(kind)
    cupti.activity_register_callbacks(requested, completed)
x = torch.randn(4096, 4096, device="cuda")
g = torch.cuda.CUDAGraph()
s = torch.cuda.Stream()
with torch.cuda.stream(s):
    for _ in range(3):
        y = x @ x
torch.cuda.synchronize()
with torch.cuda.graph(g):
    for _ in range(20):
        y = torch.relu(x @ x)
torch.cuda.synchronize()
g.replay(); torch.cuda.synchronize()
cupti.activity_flush_all(1)
print(mode, "records before the window", len(records), flush=True)
records.clear()
if mode == "split":
    for kind in EAGER:
        cupti.activity_enable(kind)
if mode == "late":
    for kind in (K.GRAPH_TRACE, *EAGER):
        cupti.activity_enable(kind)
    cupti.activity_register_callbacks(requested, completed)
t = time.perf_counter()
for _ in range(10):
    torch.cuda._sleep(1)
    g.replay()
torch.cuda.synchronize()
print("traced 10 replays in", time.perf_counter() - t, flush=True)
cupti.activity_flush_all(1)
for kind in EAGER:
    cupti.activity_disable(kind)
print("records by kind", Counter(r[0] for r in records))
for r in records[:4]:
    print(r[0], (r[2] - r[1]) / 1e3, "us", r[3][:60], r[4])
records.clear()
g.replay(); torch.cuda.synchronize(); cupti.activity_flush_all(1)
print("after disabling the eager kinds", Counter(r[0] for r in records))
