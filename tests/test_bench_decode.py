"""CPU smoke test of the decode-eviction benchmark (kvzip_cache.bench.decode_eviction) on a tiny model.

Only that each mode's row is sane and the two differ as they must (eviction ran, the answer's KV grew less, the cache
was rolled back); the figures themselves come from `python -m kvzip_cache.bench --decode-eviction off on` on a GPU.
"""

import json
from argparse import Namespace
from dataclasses import asdict

import pytest
import torch

from conftest import make_pair
from kvzip_cache import ScorePredictor
from kvzip_cache.bench.common import kv_bytes_per_token
from kvzip_cache.bench.decode_eviction import decode_rows, write_decode_report


def test_decode_rows_bound_the_answer_only_with_eviction_alternate_and_roll_back(tmp_path):
    model, _ = make_pair("llama")
    predictor = ScorePredictor.init(model, "mlp", seed=0)
    torch.manual_seed(0)
    args = Namespace(contexts=[96], ratios=[0.5, 0.25], prefill_chunk=64, decode_eviction=["off", "on"], repeats=2,
                     window=8, new_tokens=80, question_tokens=6, sample_every=16)

    runs = decode_rows(model, predictor, args, "cpu")

    assert [(row.mode, row.repeat) for row in runs] == [("off", 0), ("on", 0), ("off", 1), ("on", 1)]
    # One compressed context serves every run: each starts from the same bytes (rolled back in between), and the
    # off run after an on run evicts nothing (turned off again).
    assert len({row.context_kv_gb for row in runs}) == 1 and runs[2].evictions == 0
    token_gb = kv_bytes_per_token(model.config, 4) / 1e9
    room_gb = 5 * 8 * token_gb  # the store's reserved room: at most 4 appends of a window, plus the one that overflowed
    assert runs[1].evictions == runs[3].evictions and abs(runs[1].end_kv_gb - runs[3].end_kv_gb) <= room_gb
    rows = {row.mode: row for row in runs if row.repeat == 0}
    off, on = rows["off"], rows["on"]
    assert off.evictions == 0 and off.tail_tokens == 6 + 80 - 1  # the last token is sampled, never forwarded
    assert on.evictions > 0 and 8 <= on.tail_tokens < 2 * 8
    assert off.end_kv_gb - off.context_kv_gb >= (6 + 79) * token_gb  # every appended token, plus spare capacity
    steady = {tokens: kv for tokens, kv, _ in on.curve}  # from 32 tokens on, the tail's buffer no longer grows:
    kept = 0.25 * 48 * token_gb  # 6 evictions keep 2 of 8 tokens' pairs each, in the store's reserved room
    assert kept - 1e-12 <= steady[80] - steady[32] <= kept + room_gb
    assert on.eviction_step_ms > 0 and off.eviction_step_ms != off.eviction_step_ms  # NaN: no step evicted
    for row in runs:
        assert row.steady_median_ms > 0
        assert row.generate_s > 0 and row.ms_per_token > 0 and row.curve[-1][0] == 80 and not row.notes
        assert row.max_kv_gb >= row.end_kv_gb
        # the step record: 80 steps in bins of 256 (one mean, the whole answer's), the slowest first, evicting ones
        # flagged (no more than ran)
        assert row.bin_means_ms == [pytest.approx(row.ms_per_token, abs=1e-3)]
        times = [ms for _, ms, _ in row.slowest_steps]
        assert len(row.slowest_steps) == 24 and times == sorted(times, reverse=True)
        assert times[0] == pytest.approx(row.max_step_ms, abs=0.01)
        assert sum(evicted for *_, evicted in row.slowest_steps) <= row.evictions

    machine = {"gpu": "cpu", "torch": torch.__version__, "transformers": "-", "commit": "-", "date": "-"}
    for mode in ("off", "on"):
        record = {"machine": machine, "model": "tiny", "dtype": "float32", "weights_gb": 0.0,
                  "copy_bandwidth_tbps": 0.0, "predictor": "mlp",
                  "rows": [asdict(row) for row in runs if row.mode == mode]}
        (tmp_path / f"decode_eviction_{mode}.json").write_text(json.dumps(record))
    write_decode_report(tmp_path)
    report = (tmp_path / "decode_eviction.md").read_text()
    assert "| on | 1 | 96 | 0.25 | 8 | 80 |" in report and "the answer's KV grows by" in report
    assert "alternated 2 times" in report and "(repeats " in report and "Eviction steps add" in report
    assert (tmp_path / "decode_eviction.png").stat().st_size > 0


def test_compiled_modes_decode_static_copies_and_only_on_compiled_packs_the_tail():
    """The -compiled modes (CPU: the static path without compile): each decodes a static copy, so the compressed
    context stays as it was; on-compiled evicts between steps and its tail stays within its fixed room."""
    model, _ = make_pair("llama")
    predictor = ScorePredictor.init(model, "mlp", seed=0)
    torch.manual_seed(0)
    args = Namespace(contexts=[96], ratios=[0.25], prefill_chunk=64, decode_eviction=["off-compiled", "on-compiled"],
                     repeats=1, window=8, new_tokens=80, question_tokens=6, sample_every=16)
    off, on = decode_rows(model, predictor, args, "cpu")
    assert (off.mode, on.mode) == ("off-compiled", "on-compiled") and off.context_kv_gb == on.context_kv_gb
    assert off.evictions == 0 and off.tail_tokens == 6 + 80 - 1
    assert on.evictions > 0 and 8 <= on.tail_tokens < 2 * 8
    room = {row.mode: int(row.notes[0].split()[-1]) for row in (off, on)}  # "static tail room N"
    assert room["on-compiled"] < room["off-compiled"]
    assert on.max_kv_gb == on.end_kv_gb == on.curve[0][1]  # fixed buffers: the bytes never change while decoding
