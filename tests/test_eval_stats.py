"""The evaluation's intervals: a bootstrap that resamples contexts (the questions of a context are not independent),
paired differences between methods matched by (context, question), and the summary's tables and JSON built on them.
Each interval is checked against a brute-force resampling written here in numpy from the same generator draws."""

import json
import random

import numpy as np
import pytest
import torch

from kvzip_cache.eval import EvalConfig, runner
from kvzip_cache.eval.__main__ import parse_args
from kvzip_cache.eval.stats import bootstrap_interval, cluster_bootstrap_interval, paired_difference


def _brute_force(values, clusters, resamples=1000, level=0.95, seed=0):
    """Resample contexts the slow way: draw context numbers (numbered in order of first appearance) with the seeded
    generator, pool every question of the drawn contexts, take its mean; percentiles of those means."""
    order = list(dict.fromkeys(clusters))
    members = {c: [v for v, owner in zip(values, clusters) if owner == c] for c in order}
    picks = torch.randint(len(order), (resamples, len(order)), generator=torch.Generator().manual_seed(seed))
    means = [np.mean(np.concatenate([members[order[i]] for i in draw])) for draw in picks.tolist()]
    return tuple(np.percentile(means, [50 * (1 - level), 50 * (1 + level)]))  # linear interpolation


def _contexts(count, sizes, seed):
    """``values, clusters``: ``count`` contexts of 1..``sizes`` questions, listed interleaved (not grouped)."""
    rng = random.Random(seed)
    pairs = [(rng.random() < 0.4 + 0.2 * (c % 3), f"ctx-{c}") for c in range(count) for _ in range(rng.randint(1, sizes))]
    rng.shuffle(pairs)
    return [float(v) for v, _ in pairs], [c for _, c in pairs]


# ----------------------------------------------------------------------------------------- cluster bootstrap
@pytest.mark.parametrize("seed, resamples, level", [(0, 1000, 0.95), (5, 300, 0.8)])
def test_cluster_bootstrap_equals_a_brute_force_resampling_of_contexts(seed, resamples, level):
    values, clusters = _contexts(25, 6, seed=seed)
    expected = _brute_force(values, clusters, resamples, level, seed)
    got = cluster_bootstrap_interval(values, clusters, resamples=resamples, level=level, seed=seed)
    assert got == pytest.approx(expected, abs=1e-12)
    # resampling the questions one by one is another interval: the test can tell them apart
    assert bootstrap_interval(values, resamples=resamples, level=level, seed=seed) != pytest.approx(got, abs=1e-6)


def test_perfectly_correlated_questions_give_the_interval_of_their_contexts():
    """3 questions per context, all with the context's score: there are 40 observations, not 120. The clustered
    interval is that of the 40 context scores, about sqrt(3) wider than the per-question one."""
    rng = random.Random(1)
    per_context = [float(rng.random() < 0.5) for _ in range(40)]
    values = [v for v in per_context for _ in range(3)]
    clusters = [c for c in range(40) for _ in range(3)]
    lo, hi = cluster_bootstrap_interval(values, clusters, seed=2)
    assert (lo, hi) == pytest.approx(_brute_force(values, clusters, seed=2), abs=1e-12)
    assert (lo, hi) == pytest.approx(bootstrap_interval(per_context, seed=2), abs=1e-12)  # same draws
    naive_lo, naive_hi = bootstrap_interval(values, seed=2)
    assert hi - lo > 1.4 * (naive_hi - naive_lo)
    assert lo < sum(values) / len(values) < hi


def test_cluster_bootstrap_edge_cases_and_errors():
    assert cluster_bootstrap_interval([0.3, 0.3, 0.3], ["a", "b", "b"]) == pytest.approx((0.3, 0.3))
    assert cluster_bootstrap_interval([0.0, 1.0, 1.0], ["a", "a", "a"]) == pytest.approx((2 / 3, 2 / 3))  # one context
    assert cluster_bootstrap_interval([1.0, 0.0], "ab", seed=4) == cluster_bootstrap_interval([1.0, 0.0], "ab", seed=4)
    with pytest.raises(ValueError, match="2 values and 3 cluster ids"):
        cluster_bootstrap_interval([1.0, 0.0], ["a", "b", "c"])
    with pytest.raises(ValueError, match="at least one value"):
        cluster_bootstrap_interval([], [])
    with pytest.raises(ValueError, match="level must be in"):
        cluster_bootstrap_interval([1.0], ["a"], level=1.0)


# ----------------------------------------------------------------------------------------- paired differences
def test_paired_difference_of_a_shifted_method_is_the_shift_with_zero_width():
    values, clusters = _contexts(12, 5, seed=3)
    better = [v + 0.25 for v in values]
    mean, lo, hi = paired_difference(better, values, clusters)
    assert mean == pytest.approx(0.25, abs=1e-12) and lo == pytest.approx(0.25, abs=1e-12)
    assert hi - lo == pytest.approx(0.0, abs=1e-12)
    assert paired_difference(values, better, clusters)[0] == pytest.approx(-0.25, abs=1e-12)


def test_paired_difference_sees_what_two_overlapping_intervals_hide():
    """Method a answers what b answers, plus one more question in 12 of 30 contexts: their own intervals overlap,
    the paired one excludes 0 and equals the brute-force resampling of the differences."""
    rng = random.Random(7)
    b, a, clusters = [], [], []
    for c in range(30):
        easy = rng.random() < 0.5  # context difficulty, shared by both methods
        for q in range(4):
            score = float(easy and q < 3)
            b.append(score)
            a.append(1.0 if (q == 3 and c % 5 < 2) else score)
            clusters.append(c)
    a_lo, a_hi = cluster_bootstrap_interval(a, clusters)
    b_lo, b_hi = cluster_bootstrap_interval(b, clusters)
    assert a_lo < b_hi  # unpaired: the intervals overlap
    mean, lo, hi = paired_difference(a, b, clusters)
    assert mean == pytest.approx(np.mean(np.subtract(a, b)))
    assert (lo, hi) == pytest.approx(_brute_force(list(np.subtract(a, b)), clusters), abs=1e-12)
    assert 0.0 < lo <= mean <= hi


def test_paired_difference_refuses_unaligned_or_empty_input():
    with pytest.raises(ValueError, match="aligned.*lengths 3, 2 and 3"):
        paired_difference([1.0, 0.0, 1.0], [1.0, 0.0], ["a", "a", "b"])
    with pytest.raises(ValueError, match="aligned.*lengths 2, 2 and 1"):
        paired_difference([1.0, 0.0], [1.0, 0.0], ["a"])
    with pytest.raises(ValueError, match="at least one question"):
        paired_difference([], [], [])


# ------------------------------------------------------------------------------------------- runner: cells
def _rows(method, scores, ratio=0.5, task="needle"):
    """Result rows: ``scores[c][q]`` is the score of question ``needle-<q>`` of context ``needle-<c>`` (the needle ids
    repeat in every context, as the real task's do)."""
    return [{"task": task, "context_id": f"needle-{c}", "question_id": f"needle-{q}", "method": method,
             "ratio": ratio, "scores": {"contains": float(v)}} for c, qs in enumerate(scores) for q, v in enumerate(qs)]


KVZIP = [[1, 1, 1], [0, 0, 1], [1, 1, 0], [0, 0, 0], [1, 1, 1]]
RANDOM = [[1, 0, 1], [0, 0, 0], [1, 0, 0], [0, 0, 0], [0, 0]]  # context 4 lacks its third question
FULL = [[1, 1, 1], [1, 0, 1], [1, 1, 1], [0, 1, 0], [1, 1, 1]]


def test_cell_stats_resample_contexts_and_count_questions_and_contexts():
    rows = _rows("kvzip", KVZIP) + _rows("random", RANDOM)
    cells = runner.cell_stats(rows, seed=3)
    values = [float(v) for qs in KVZIP for v in qs]
    clusters = [c for c, qs in enumerate(KVZIP) for _ in qs]
    cell = cells[("needle", "contains", "kvzip", 0.5)]
    assert (cell.n, cell.contexts) == (15, 5) and cell.mean == pytest.approx(np.mean(values))
    assert (cell.lo, cell.hi) == pytest.approx(_brute_force(values, clusters, seed=3), abs=1e-12)
    assert (cells[("needle", "contains", "random", 0.5)].n, cells[("needle", "contains", "random", 0.5)].contexts) \
        == (14, 5)
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    assert runner.cell_stats(shuffled, seed=3) == cells  # the order rows were written in does not matter


def test_paired_stats_match_by_context_and_question_and_full_stands_for_every_ratio():
    rows = _rows("kvzip", KVZIP) + _rows("random", RANDOM) + _rows("full", FULL, ratio=1.0)
    random.Random(1).shuffle(rows)
    paired = runner.paired_stats(rows, "kvzip", [0.5], seed=0)
    assert set(paired) == {("needle", "contains", "random", 0.5), ("needle", "contains", "full", 0.5)}

    # random - kvzip on the 14 questions both answered, matched by hand
    diffs = [(c, RANDOM[c][q] - KVZIP[c][q]) for c in range(5) for q in range(len(RANDOM[c]))]
    cell = paired[("needle", "contains", "random", 0.5)]
    assert (cell.n, cell.contexts) == (14, 5)
    assert cell.mean == pytest.approx(np.mean([d for _, d in diffs]))
    assert (cell.lo, cell.hi) == pytest.approx(
        _brute_force([float(d) for _, d in diffs], [c for c, _ in diffs]), abs=1e-12)
    # (matched by question id alone, the 5 contexts' needle-0 would collapse into one: n would be 2 or 3)

    full = paired[("needle", "contains", "full", 0.5)]  # full's ratio-1.0 rows against kvzip at 0.5
    assert (full.n, full.contexts) == (15, 5)
    assert full.mean == pytest.approx(np.mean(np.subtract(sum(FULL, []), sum(KVZIP, []))))

    against_full = runner.paired_stats(rows, "full", [0.5, 0.2])  # and as the reference, at any ratio
    assert against_full[("needle", "contains", "kvzip", 0.5)].mean == pytest.approx(-full.mean)
    assert ("needle", "contains", "kvzip", 0.2) not in against_full  # no kvzip rows at 0.2


def test_paired_stats_leave_out_cells_without_shared_questions():
    rows = _rows("kvzip", KVZIP) + [dict(r, context_id="other") for r in _rows("random", RANDOM)]
    assert runner.paired_stats(rows, "kvzip", [0.5]) == {}


# ----------------------------------------------------------------------------------------- summary and CLI
def test_paired_reference_defaults_to_kvzip_then_full_then_the_first_method():
    assert runner.paired_reference(EvalConfig(methods=["full", "random", "kvzip"])) == "kvzip"
    assert runner.paired_reference(EvalConfig(methods=["random", "full"])) == "full"
    assert runner.paired_reference(EvalConfig(methods=["snapkv", "random"])) == "snapkv"
    assert runner.paired_reference(EvalConfig(methods=["kvzip", "random"], paired_reference="random")) == "random"


def test_summary_markdown_and_json_show_counts_and_the_paired_table():
    rows = _rows("kvzip", KVZIP) + _rows("random", RANDOM) + _rows("full", FULL, ratio=1.0)
    config = EvalConfig(methods=["full", "kvzip", "random"], ratios=[0.5])
    text = runner.summary_markdown(rows, config)
    cell = runner.cell_stats(rows)[("needle", "contains", "kvzip", 0.5)]
    assert "| method | n | contexts | 0.5 |" in text
    assert f"| kvzip | 15 | 5 | {cell.mean:.3f} [{cell.lo:.3f}, {cell.hi:.3f}] |" in text
    assert "### needle — contains: paired difference vs kvzip, context-clustered 95% interval" in text
    diff = runner.paired_stats(rows, "kvzip", [0.5])[("needle", "contains", "random", 0.5)]
    assert f"| random | 14 | 5 | {diff.mean:+.3f} [{diff.lo:+.3f}, {diff.hi:+.3f}] |" in text
    paired_part = text.split("paired difference vs kvzip")[1]
    assert "| kvzip |" not in paired_part  # the reference is not compared with itself

    summary = json.loads(json.dumps(runner.summary_json(rows, config)))  # JSON-clean
    assert summary["reference"] == "kvzip" and summary["interval"]["resampled"] == "contexts"
    assert {"task": "needle", "metric": "contains", "method": "kvzip", "ratio": 0.5, "mean": cell.mean,
            "lo": cell.lo, "hi": cell.hi, "n": 15, "contexts": 5} in summary["cells"]
    assert {"task": "needle", "metric": "contains", "method": "random", "reference": "kvzip", "ratio": 0.5,
            "mean": diff.mean, "lo": diff.lo, "hi": diff.hi, "n": 14, "contexts": 5} in summary["paired"]
    assert {r["method"] for r in summary["paired"]} == {"full", "random"}


def test_cli_paired_reference_is_one_of_the_run_methods(capsys):
    config = parse_args(["--out", "x", "--methods", "kvzip", "random", "--paired-reference", "random"])
    assert config.paired_reference == "random"
    assert parse_args(["--out", "x"]).paired_reference is None  # kvzip, the default methods having it
    with pytest.raises(SystemExit):
        parse_args(["--out", "x", "--methods", "kvzip", "random", "--paired-reference", "snapkv"])
    assert "--paired-reference 'snapkv' is not one of the run's methods" in capsys.readouterr().err
