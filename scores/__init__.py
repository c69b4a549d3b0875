"""Artifacts computed by this project for the models that install from PyPI, shipped in the wheel as
``kvzip_cache.scores``:

- head scores (``<model>.safetensors``, listed in ``manifest.json`` with the command that made each):
  ``HeadScores.from_pretrained("smollm2-135m")``;
- score predictors (``predictor-<model>-<kind>.safetensors``, listed in ``predictors.json`` with how each was trained
  and its held-out metrics): ``ScorePredictor.from_pretrained("smollm2-135m")``.
"""
