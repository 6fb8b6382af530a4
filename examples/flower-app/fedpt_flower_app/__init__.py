"""fedpt's Flower apps, as `flwr run` finds them (see pyproject.toml)."""
