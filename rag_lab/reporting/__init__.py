"""What the runs leave and the tables made from them: `results` (the results tables: atomic upserts, the
Markdown beside every CSV, display helpers), `runs` (run folders and the main table they stand for: checks,
rebuild, repair; torch-free), `timings` (each stage's wall against the FLOP floor), `readme` (the generated
blocks of README.md and docs/*.md). Below the runner: the runner, the pipeline and the studies write through it.
"""
