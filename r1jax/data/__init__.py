"""Tokenizer, templates, tasks and input pipelines.

tokenizer.py   sentencepiece + the R1-Zero and R1 chat templates (`TEMPLATES`)
tasks/         `TASKS` (arithmetic, countdown) with held-out splits; JSONL readers
pipelines.py   grain: SFT token batches and RL prompt batches with resumable state
"""
