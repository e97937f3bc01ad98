"""asv benchmarks: ``asv run --quick --python=same`` from the repository root (see asv.conf.json)."""
