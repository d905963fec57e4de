"""Measurements of the four method scripts: GPU checks, the memory table, adaptation and mechanism studies, and
the measuring tools behind `--profile` / `--estimate-memory` (measure.py)."""
