"""Mesh, sharding rules and expert parallelism."""
