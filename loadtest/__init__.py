"""Load generator (`python -m loadtest`) and side-by-side benchmarks (`python -m loadtest.bench`)
for eft-serve, or any OpenAI-compatible streaming server."""
