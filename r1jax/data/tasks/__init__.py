"""Procedural verifiable tasks with worked solutions."""
