"""Evaluation as R1 reports it: benchmarks, k samples per prompt, pass@1 / cons@k / pass@k.

metrics.py (pure: pass@k, the majority vote), benchmarks.py (which problems),
evaluate.py (sample, score, summarise, write), stage.py (the `eval` stage).
"""
