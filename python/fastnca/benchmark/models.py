"""Model-level benchmarks (Med-NCA and GeCA training steps) -- registered when the models
are present."""
SUITES: dict = {}
