"""The flower row's apps (bench/flower.py)."""
