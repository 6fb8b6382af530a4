"""The energy a node's round used, read from the hardware's own counters.

    GPU: NVML's total-energy counter (millijoules since the driver loaded) of every GPU visible
         to this process (CUDA_VISIBLE_DEVICES), Volta or newer; the `gpu` extra's pynvml.
    CPU: the kernel's RAPL counters of this host's CPU packages (microjoules, wrapping at
         max_energy_range_uj) in /sys/class/powercap: intel-rapl:N (or amd-rapl:N) only, as a
         package's core, uncore and DRAM sub-zones are inside it and psys covers the platform.

A round is measured by reading the counters when it starts and when it stops: a few file reads
and NVML calls per round (and the RAPL files every 30 s, only to see each wrap). Nothing is ever estimated: where a counter cannot be read (no NVML,
a GPU without the counter, no powercap folder, RAPL readable by root only), that energy is
None, and `EnergyMeter.unmeasured` says why.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

POWERCAP_ROOT = Path("/sys/class/powercap")
# Top-level package domains; sub-zones are intel-rapl:N:M, and intel-rapl-mmio:N repeats a package.
PACKAGE_DOMAIN = re.compile(r"(intel|amd)-rapl:\d+")
# A package's RAPL counter wraps after max_energy_range_uj (e.g. 262 kJ: minutes at full power):
# it is read this often in between, so that every wrap is seen.
WRAP_CHECK_SECONDS = 30.0
KINDS = ("GPU", "CPU")


class Unmeasurable(RuntimeError):
    """A counter cannot be read here; the message says why, in one line."""


@dataclass(frozen=True)
class RoundEnergy:
    gpu_joules: float | None = None  # NVML: the GPUs visible to this process; None: not measured
    cpu_joules: float | None = None  # RAPL: this host's CPU packages; None: not measured


class NvmlEnergy:
    """Joules used by the GPUs visible to this process since NVML's driver loaded."""

    def __init__(self, visible_devices: str | None) -> None:
        try:
            import pynvml
        except ImportError as e:
            raise Unmeasurable("pynvml is not installed: pip install 'fedpt[gpu]'") from e
        self._nvml = pynvml
        try:
            pynvml.nvmlInit()
        except (pynvml.NVMLError, AttributeError, OSError) as e:
            raise Unmeasurable(f"NVML did not start: {e}") from e
        try:
            self._handles = _visible_handles(pynvml, visible_devices)
            self.joules()  # GPUs before Volta have no energy counter: NVMLError "Not Supported"
        except (pynvml.NVMLError, AttributeError) as e:
            self.close()
            raise Unmeasurable(f"NVML cannot read the GPUs' energy counters: {e}") from e
        except Unmeasurable:
            self.close()
            raise
        self.what = f"{len(self._handles)} GPU(s)"

    def joules(self) -> float:
        read = self._nvml.nvmlDeviceGetTotalEnergyConsumption
        return sum(read(h) for h in self._handles) / 1e3  # millijoules

    def close(self) -> None:
        with contextlib.suppress(self._nvml.NVMLError, AttributeError):
            self._nvml.nvmlShutdown()


def _visible_handles(pynvml, visible: str | None) -> list:
    """NVML handles of the GPUs CUDA_VISIBLE_DEVICES names: indices (NVML counts in PCI bus
    order, as CUDA does with CUDA_DEVICE_ORDER=PCI_BUS_ID) or GPU-… UUIDs; every GPU when it
    is unset or names them otherwise."""
    count = pynvml.nvmlDeviceGetCount()
    entries = [e.strip() for e in (visible or "").split(",") if e.strip()]
    if visible is not None and not entries:
        raise Unmeasurable("CUDA_VISIBLE_DEVICES hides every GPU")
    if any(e.startswith("MIG-") for e in entries):
        raise Unmeasurable("a MIG instance shares its GPU's energy counter with the others")
    if entries and all(e.isdigit() for e in entries):
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i)
                   for i in dict.fromkeys(int(e) for e in entries) if i < count]  # fmt: skip
    elif entries and all(e.startswith("GPU-") for e in entries):
        handles = [pynvml.nvmlDeviceGetHandleByUUID(e) for e in dict.fromkeys(entries)]
    else:
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    if not handles:
        raise Unmeasurable("NVML sees no GPU visible to this process")
    return handles


class RaplEnergy:
    """Joules used by this host's CPU packages since this object was made, counting each wrap
    of a package's counter seen between two reads (thread-safe)."""

    def __init__(self, root: Path = POWERCAP_ROOT) -> None:
        root = Path(root)
        if not root.is_dir():
            raise Unmeasurable(f"{root} does not exist: no RAPL driver, or not Linux")
        self._domains = [d for d in sorted(root.iterdir()) if _is_package(d)]
        if not self._domains:
            raise Unmeasurable(f"{root} has no RAPL package domain (intel-rapl:N, amd-rapl:N)")
        self._ranges = [_read_uj(d / "max_energy_range_uj") for d in self._domains]
        self._last = [_read_uj(d / "energy_uj") for d in self._domains]
        self._total_uj = 0
        self._lock = threading.Lock()
        self.what = f"{len(self._domains)} CPU package(s)"

    def joules(self) -> float:
        with self._lock:
            for i, domain in enumerate(self._domains):
                now = _read_uj(domain / "energy_uj")
                step = now - self._last[i]
                if step < 0:  # the counter wrapped at max_energy_range_uj since the last read
                    step += self._ranges[i]
                self._total_uj += step
                self._last[i] = now
            return self._total_uj / 1e6

    def close(self) -> None:
        pass  # files are opened per read


def _is_package(domain: Path) -> bool:
    if not PACKAGE_DOMAIN.fullmatch(domain.name):
        return False
    try:  # psys, on some laptops a top-level domain too, covers the whole platform
        return (domain / "name").read_text().strip().startswith("package")
    except OSError:
        return True


def _read_uj(path: Path) -> int:
    try:
        return int(path.read_text())
    except PermissionError as e:
        raise Unmeasurable(
            f"{path} is readable by root only: run the node as root, or grant read access"
        ) from e
    except (OSError, ValueError) as e:
        raise Unmeasurable(f"cannot read {path}: {e}") from e


class EnergyMeter:
    """Both counters, read when a round starts and when it stops: `start()` … `stop()` per
    round (stop returns the same RoundEnergy until the next start), `close()` at the end; as a
    context manager, one measurement (enter starts; exit stops and closes)."""

    def __init__(
        self,
        *,
        powercap_root: str | Path = POWERCAP_ROOT,
        wrap_check_seconds: float | None = WRAP_CHECK_SECONDS,
        log: Callable[[str], None] = lambda _m: None,
    ) -> None:
        self.log = log
        self.unmeasured: dict[str, str] = {}  # "GPU" | "CPU" -> why it is not measured
        self.measured: dict[str, str] = {}  # "GPU" | "CPU" -> what is measured
        self._readers: dict[str, NvmlEnergy | RaplEnergy] = {}
        opening = {"GPU": lambda: NvmlEnergy(os.environ.get("CUDA_VISIBLE_DEVICES")),
                   "CPU": lambda: RaplEnergy(Path(powercap_root))}  # fmt: skip
        for kind, open_reader in opening.items():
            try:
                reader = open_reader()
            except Exception as e:  # an energy reading is never worth a node that cannot start
                self.unmeasured[kind] = _reason(e)
            else:
                self._readers[kind], self.measured[kind] = reader, reader.what
        self._start: dict[str, float | None] = {}
        self._result: RoundEnergy | None = None
        self._closed = threading.Event()
        self._wrap_check: threading.Thread | None = None
        if "CPU" in self._readers and wrap_check_seconds:
            self._wrap_check = threading.Thread(target=self._check_wraps, args=(wrap_check_seconds,),
                                                name="rapl-wrap-check", daemon=True)  # fmt: skip
            self._wrap_check.start()

    def describe(self) -> str:
        """One line for the node's log: what is measured, and why the rest is not."""
        parts = [f"{kind} measured ({self.measured[kind]})" if kind in self.measured
                 else f"{kind} not measured ({self.unmeasured[kind]})" for kind in KINDS]  # fmt: skip
        return "energy: " + "; ".join(parts)

    def start(self) -> None:
        self._start = {kind: self._joules(kind) for kind in self._readers}
        self._result = None

    def read(self) -> RoundEnergy:
        """The energy since `start()` so far, without stopping."""
        return self._result or self._since_start()

    def stop(self) -> RoundEnergy:
        if self._result is None:
            self._result = self._since_start()
        return self._result

    def close(self) -> None:
        self._closed.set()
        if self._wrap_check is not None:
            self._wrap_check.join()
        for kind in list(self._readers):
            self._readers.pop(kind).close()

    def __enter__(self) -> EnergyMeter:
        self.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.stop()
        self.close()

    def _since_start(self) -> RoundEnergy:
        spent = {}
        for kind in KINDS:
            began = self._start.get(kind)
            now = self._joules(kind) if began is not None else None
            # A counter that went back (a driver reloaded) says nothing about this round.
            spent[kind] = now - began if now is not None and now >= began else None
        return RoundEnergy(gpu_joules=spent["GPU"], cpu_joules=spent["CPU"])

    def _joules(self, kind: str) -> float | None:
        reader = self._readers.get(kind)
        if reader is None:
            return None
        try:
            return reader.joules()
        except Exception as e:  # from now on this energy is not measured; said once
            self._readers.pop(kind).close()
            self.measured.pop(kind, None)
            self.unmeasured[kind] = _reason(e)
            self.log(f"energy: {kind} no longer measured ({self.unmeasured[kind]})")
            return None

    def _check_wraps(self, seconds: float) -> None:
        while not self._closed.wait(seconds):
            reader = self._readers.get("CPU")
            if reader is None:
                return
            try:
                reader.joules()
            except Exception:  # the next start() or stop() says so
                return


def _reason(error: Exception) -> str:
    return str(error) if isinstance(error, Unmeasurable) else f"{type(error).__name__}: {error}"
