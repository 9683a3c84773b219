"""Benchmarks of the order service against a real Kafka broker and a real PostgreSQL server.

Run ``python -m benchmarks.run [--quick]``. Every figure is reported next to a limit of this
machine measured in the same run (raw produce, raw consume, raw COPY), so results from
different machines compare as ratios.
"""
