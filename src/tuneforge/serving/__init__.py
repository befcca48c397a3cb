"""Serving: HTTP app, micro-batched predictor, Prometheus metrics, request log and drift monitor.
Imports neither training nor tuning."""
