"""Energy as `fedpt status` and `fedpt report` show it: measured joules in kWh, tokens per kWh,
and the cost and CO2e the user's own price and grid intensity give. Nothing measured is said
so; nothing is ever estimated from hardware specs."""

from __future__ import annotations

import math
from dataclasses import dataclass

JOULES_PER_KWH = 3.6e6
NOT_MEASURED = "not measured"
WHY_NOT_MEASURED = ("no node could measure it: energy is read from NVML on GPUs and RAPL on CPU "
                    "packages, and none was readable")  # fmt: skip


@dataclass(frozen=True)
class EnergyPrices:
    """What a kWh costs and emits where the nodes run (set by the user; no default guesses)."""

    price_per_kwh: float | None = None
    currency: str = "EUR"
    grid_gco2_per_kwh: float | None = None  # grams of CO2-equivalent per kWh

    def __post_init__(self) -> None:
        for name in ("price_per_kwh", "grid_gco2_per_kwh"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite, non-negative number, got {value}")


def kwh(joules: float) -> float:
    return joules / JOULES_PER_KWH


def kwh_text(joules: float | None) -> str:
    if joules is None:
        return NOT_MEASURED
    value = kwh(joules)
    return f"{value:.3g} kWh" if value >= 1e-3 else f"{value * 1000:.3g} Wh"


def energy_summary(joules: float | None, measured_tokens: int, prices: EnergyPrices) -> str:
    """One line: the energy measured, tokens per kWh over the uploads that carried a
    measurement, and the estimated cost and CO2e from `prices`."""
    if joules is None:
        return f"energy: {NOT_MEASURED} ({WHY_NOT_MEASURED})"
    parts = [f"energy: {kwh_text(joules)} measured"]
    if joules > 0 and measured_tokens:
        parts.append(f"{measured_tokens / kwh(joules):,.0f} tokens/kWh")
    if prices.price_per_kwh is None:
        parts.append("cost: pass --price-per-kwh")
    else:
        parts.append(f"estimated cost {kwh(joules) * prices.price_per_kwh:.4g} {prices.currency}")
    if prices.grid_gco2_per_kwh is None:
        parts.append("CO2e: pass --grid-gco2-per-kwh")
    else:
        grams = kwh(joules) * prices.grid_gco2_per_kwh
        parts.append(f"estimated {grams / 1000:.4g} kg CO2e" if grams >= 1000
                     else f"estimated {grams:.3g} g CO2e")  # fmt: skip
    return "; ".join(parts)
