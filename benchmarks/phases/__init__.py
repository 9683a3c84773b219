"""The benchmark's phases, one module each, named as the phase (``benchmarks.run`` runs them)."""
