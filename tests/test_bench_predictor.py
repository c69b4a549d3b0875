"""CPU smoke test of the bench's score-predictor rows and capacity search (kvzip_cache.bench.predictor,
kvzip_cache.bench.capacity) on a tiny model.

Only that the rows exist and are sane (times > 0, the evicting prefill keeps about ``ratio`` of the context's KV,
the search visits the lengths it should); the figures themselves come from `python -m kvzip_cache.bench` on a GPU.
"""

import math
import time
from dataclasses import asdict

import pytest
import torch

from conftest import VOCAB, ByteTokenizer, make_pair
from kvzip_cache import ScorePredictor
from kvzip_cache.bench.capacity import capacity_rows, longest, write_capacity_report
from kvzip_cache.bench.common import GB, kv_bytes_per_token, random_context
from kvzip_cache.bench.decode import write_report
from kvzip_cache.bench.predictor import predictor_rows


def _record(rows, **extra) -> dict:
    machine = {"gpu": "cpu", "torch": torch.__version__, "transformers": "-", "commit": "-", "date": "-"}
    return {"machine": machine, "model": "tiny", "dtype": "float32", "weights_gb": 0.0, "copy_bandwidth_tbps": 0.0,
            "rows": [asdict(r) for r in rows], **extra}


def test_predictor_rows_measure_predicted_compress_and_the_evicting_prefill(tmp_path):
    model, _ = make_pair("llama")
    predictor = ScorePredictor.init(model, "mlp", seed=0)
    torch.manual_seed(0)
    batch, context, chunk = 2, 96, 32
    ids, mask = random_context(batch, context, VOCAB, "cpu", padded=True)  # row 1: 12 tokens of left padding
    starts = torch.tensor([0, 12]) + 4  # 4 protected prefix tokens per row
    kv_per_token = kv_bytes_per_token(model.config, 4)
    rows = predictor_rows(model, predictor, ids, mask, starts, [0.25, 0.5], chunk=chunk, kv_per_token=kv_per_token,
                          dynamic_prefill_s=1.0, score_chunk=40, tokenizer=ByteTokenizer())

    assert [(r.method, r.ratio) for r in rows] == [("kvzip-pred", 0.5), ("kvzip-pred", 0.25),
                                                   ("kvzip-evict", 0.5), ("kvzip-evict", 0.25),
                                                   ("kvzip-evict+kvzip", 0.5), ("kvzip-evict+kvzip", 0.25)]
    context_tokens = (context - 4) + (context - 16)  # real tokens after each row's prefix
    prefix_bytes = 2 * 4 * kv_per_token
    pred = {r.ratio: r for r in rows if r.method == "kvzip-pred"}
    for r in rows:
        assert r.prefill_s > 0 and r.plain_prefill_s > 0 and r.dynamic_prefill_s == 1.0
        assert r.context == context and r.batch == batch and "achieved ratio" in r.notes[0]
        if r.method == "kvzip-pred":
            assert r.compress_s > 0 and r.prefill_s == r.plain_prefill_s
            assert r.scoring_s == pred[0.5].compress_s  # the first compress predicts; the second re-selects
        elif r.method == "kvzip-evict+kvzip":  # prefill kept min(1, 2r), then KVzip scored the survivors
            assert r.compress_s > 0 and "prefill kept " + f"{min(1.0, 2 * r.ratio):g}" in r.notes[0]
            assert float(r.notes[0].split(";")[0].split()[-1]) == pytest.approx(r.ratio, abs=0.02)
            assert r.kv_gb == pytest.approx(pred[r.ratio].kv_gb, rel=0.05)
        else:
            assert math.isnan(r.compress_s)
            # kept KV (plus 4-byte positions per pair: +3% here) ~ ratio x the plain prefill's context KV
            kept = (r.kv_gb * GB - prefix_bytes) / (context_tokens * kv_per_token)
            assert r.ratio <= kept <= 1.08 * r.ratio, (r.ratio, kept)
            assert r.kv_gb == pytest.approx(pred[r.ratio].kv_gb, rel=0.05)
            achieved = float(r.notes[0].split()[-1])
            assert achieved == pytest.approx(r.ratio, abs=0.02)

    write_report(_record(rows), tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "## Score predictor" in report and report.count("| kvzip-evict |") == 4  # main table + predictor table
    assert report.count("| kvzip-evict+kvzip |") == 4


@pytest.mark.parametrize("dense", ["kvzip", "dynamic"])
def test_capacity_rows_try_the_dense_stand_in_and_the_evicting_prefill(tmp_path, dense):
    model, _ = make_pair("llama")
    predictor = ScorePredictor.init(model, "linear", seed=0)
    rows, summary = capacity_rows(model, predictor, 0.25, cap=256, chunk=32, budget_s=60.0, dense=dense, start=64,
                                  step=32)

    # the real dense check at start, eviction at the cap (fits on a CPU), the stand-in doubling from start to the cap
    assert [(r.method, r.context) for r in rows] == [("capacity-dense", 64), ("capacity-evict", 256),
                                                     ("capacity-dense", 64), ("capacity-dense", 128),
                                                     ("capacity-dense", 256)]
    assert all(r.fits for r in rows) and all(r.kv_gb > 0 for r in rows)
    assert rows[0].prefill_s > 0 and rows[1].prefill_s > 0 and "real prefill" in rows[0].notes[0]
    assert all("stand-in: " in r.notes[0] for r in rows[2:])
    # the evicting prefill keeps its 16 prefix tokens and 0.25 of the other 240 (plus 4-byte positions per pair: +3%)
    assert rows[1].kv_gb == pytest.approx((16 + 0.25 * 240) / 256 * rows[4].kv_gb, rel=0.05)
    assert model.config._attn_implementation == "kvzip"  # the dynamic tries switch to SDPA and back
    assert summary["dense_tokens"] == summary["evict_tokens"] == 256 and summary["dense_failed_at"] is None
    assert summary["dense_search_complete"] and summary["evict_search_complete"]
    assert summary["evict_vs_dense_at_least"] is None  # dense never failed: no lower bound on the ratio

    write_capacity_report(_record(rows, capacity=summary), tmp_path)
    assert (tmp_path / "capacity.md").read_text().count("| capacity-") == 5


def test_longest_doubles_then_bisects_and_respects_the_deadline():
    tried = []

    def fits(length):
        tried.append(length)
        return length <= 700_000

    assert longest(fits, 131072, 1 << 20, 65536, math.inf) == (655360, 720896, True)
    assert tried == [131072, 262144, 524288, 1048576, 786432, 655360, 720896]
    tried.clear()
    assert longest(lambda n: tried.append(n) or True, 1 << 20, 1 << 20, 65536, math.inf) == (1 << 20, None, True)
    assert tried == [1 << 20]
    assert longest(fits, 131072, 1 << 20, 65536, time.perf_counter() - 1) == (0, None, False)
