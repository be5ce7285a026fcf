"""Tokenizer, templates, tasks and input pipelines."""
