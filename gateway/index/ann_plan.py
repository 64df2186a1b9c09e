"""How the embedded index answers a kNN query: which ANN index it builds, and per query whether
to search exactly or through the index with how many partitions probed and how much re-ranking.

Kept apart from the LanceDB plumbing so that `benchmarks/index_scale.py --sweep` measures the
serving path's own decisions next to the other settings it sweeps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def partitions_for(rows: int) -> int:
    """IVF partitions: sqrt(rows)/2 (500 at 1 M)."""
    return max(1, int(np.sqrt(rows) / 2))


def scalar_indexes() -> list[tuple[str, object]]:
    """(column, LanceDB index config) for the columns queries look up or filter on. Every kNN
    carries `deleted = false` and most a category, market or stock filter; without these
    indexes LanceDB's pre-filter scans the columns on every query (measured at 1 M rows: +30 ms
    per query for `deleted` alone, +60 ms with a category; `benchmarks/index_filters.py`).
    Bitmaps for the few-valued columns, B-trees for ids, brands and prices, a label list for
    the sizes array (`array_has_any`)."""
    from lancedb.index import Bitmap, BTree, LabelList

    return [
        ("id", BTree()),
        ("item_id", BTree()),
        ("deleted", Bitmap()),
        ("category", Bitmap()),
        ("gender", Bitmap()),
        ("market", Bitmap()),
        ("in_stock", Bitmap()),
        ("brand", BTree()),
        ("price", BTree()),
        ("sizes", LabelList()),
    ]


def index_config(rows: int):
    """The vector index `optimize()` builds (LanceDB IVF-HNSW-SQ, cosine)."""
    from lancedb.index import IvfHnswSq

    return IvfHnswSq(distance_type="cosine", num_partitions=partitions_for(rows))


# Measured at 1 M x 1024-d on 2 cores (benchmarks/RESULTS.md, "Embedded index knob sweep", three
# builds): recall does not grow past 8 probed partitions (a query's neighbours sit in a few
# partitions); what it loses is the HNSW walk and the 8-bit scalar quantisation, which ef and a
# re-rank of 4x the candidates on full vectors recover: unfiltered recall@10 0.95-0.98 at p50
# 10-12 ms, against 0.91-0.96 at 22-28 ms for the old plan (a tenth of the partitions). Under a
# filter LanceDB pre-filters inside each partition: the same settings give 0.94-0.98 at 5 %
# (10 ms) where the old plan probed all 500 partitions (70 ms), while at 0.5 % no setting passes
# 0.52, hence exact search below exact_max_rows.
MIN_NPROBES = 8
NPROBES_SHARE = 1 / 60  # of the partitions: 8 of 500 at 1 M rows
REFINE = 4
EF = 300

# Batch jobs (the dedup self-join) look for a listing's re-shot copies, which sit further from
# it than a query from its answers and so more often in another partition. Measured at 1 M
# listings (64-d, `benchmarks/dedup_scale.py`'s world) under a category filter leaving 38 k
# rows, 11 neighbours: the share of a listing's copies among its own neighbours was 0.84 at 8
# probes, 0.91 at 12, 0.94 at 16, 0.97 at 24, 0.99 at 32, and the share of copy pairs found
# from either side (what grouping needs) 0.977 / 0.991 / 0.998 / 0.999 from 12 to 32 probes, at
# 433 / 417 / 321 / 261 queries/s; ef (50-300) and refine (0-4) changed nothing, and the job
# re-checks every candidate on full vectors, so it needs no refine. A twenty-fourth of the
# partitions, at least 24 (24 at 1 M rows, 72 at 12 M).
JOB_MIN_NPROBES = 24
JOB_NPROBES_SHARE = 1 / 24
JOB_EF = 100


@dataclass(frozen=True)
class SearchPlan:
    exact: bool
    nprobes: int = 0
    refine: int = 0
    ef: int = 0

    def apply(self, query):
        if self.exact:
            return query.bypass_vector_index()
        query = query.nprobes(self.nprobes)
        if self.refine:
            query = query.refine_factor(self.refine)
        return query.ef(self.ef) if self.ef else query


def plan_search(partitions: int, matching: int, exact_max_rows: int, job: bool = False) -> SearchPlan:
    """Exact when there is no ANN index or the filter leaves at most exact_max_rows (the ANN
    index cannot find a few scattered rows: recall 0.3-0.5 at 0.5 %); otherwise the index with
    the measured settings, whatever the filter (pre-filtering keeps them good down to 5 %).
    `job`: a batch job's settings (more probes, no refine) instead of the serving path's."""
    if not partitions or matching <= exact_max_rows:
        return SearchPlan(exact=True)
    if job:
        nprobes = min(partitions, max(JOB_MIN_NPROBES, round(partitions * JOB_NPROBES_SHARE)))
        return SearchPlan(exact=False, nprobes=nprobes, refine=0, ef=JOB_EF)
    nprobes = min(partitions, max(MIN_NPROBES, round(partitions * NPROBES_SHARE)))
    return SearchPlan(exact=False, nprobes=nprobes, refine=REFINE, ef=EF)
