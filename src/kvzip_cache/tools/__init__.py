"""Offline tooling (training, calibration, evaluation helpers): may import anything; the core never imports it."""
