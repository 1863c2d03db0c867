"""Hostile-input tests (README "Threat model"): each case feeds one attack to the real
stage and asserts the named refusal and that every other sample is intact. The shared
fixtures (local image server, Ray, LAION writers) come from ``tests/conftest.py``."""
