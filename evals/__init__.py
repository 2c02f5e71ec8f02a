"""`eft-sweep`: knob sweeps and scorers for any family, through the OpenAI-compatible API.

`evals.sweep` (the command and `run_sweep`), `evals.grid` (knob grids), `evals.scorers`,
`evals.prompts` (JSONL prompt files), `evals.stats` (means and 95% intervals), `evals.plot`.
Nothing here imports torch: it runs on any machine that can reach the server.
"""
