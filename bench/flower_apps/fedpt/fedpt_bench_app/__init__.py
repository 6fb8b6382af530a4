"""The fedpt row's apps (bench/flower.py)."""
