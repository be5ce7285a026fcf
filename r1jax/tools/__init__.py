"""Command-line tools: benchmarks and planning."""
