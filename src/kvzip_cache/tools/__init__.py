"""Offline tooling: calibrating head scores and training score predictors for a model (training and calibration
run the cache; the core never imports this package).

- `calibration`: ``compute_head_scores(model, tokenizer, texts)`` (``python -m kvzip_cache.score_heads``).
- `training`: ``train_score_predictor(model, tokenizer, texts)`` and its held-out evaluation
  (``python -m kvzip_cache.train_predictor``); `fitting`: ridge and the batched MLP trainer with its objectives;
  `corpus`: the varied training text.

The evaluation (`kvzip_cache.eval`), the benchmarks (`kvzip_cache.bench`) and the model and data plumbing
(`kvzip_cache.zoo`) are tooling too, each a package of its own.
"""

from .calibration import calibration_texts, compute_head_scores
from .training import ScoreDataset, collect_dataset, evaluate_predictor, fit_predictor, train_score_predictor

__all__ = ["ScoreDataset", "calibration_texts", "collect_dataset", "compute_head_scores", "evaluate_predictor",
           "fit_predictor", "train_score_predictor"]
