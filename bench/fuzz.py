"""Malformed-input fuzzing at scale: every fedpt.v1.Federation RPC against real aggregators.

The cases and checks are tests/fuzzing.py's (tests/test_fuzz_rpc.py runs a few hundred of them
in CI): random bytes, mutations of valid messages and structured messages with wrong values,
sent as raw bytes to a plain-text aggregator and to a mutual-TLS one with secure aggregation,
whose round is driven through its four stages (ADVERTISE, SHARE, MASKED_INPUT, UNMASK). Half
the cases go to each; each stage fuzzes its own RPCs three times as hard as the others; every
RPC also gets one message over the server's size limit.

Measured: cases per target and RPC and by kind; the status codes they were answered with;
invariant violations: crashes (UNKNOWN, or INTERNAL from fedpt code, an internal error logged,
a dead ticker, failed health checks), changes to stored state (database rows, files, running
sum, uploads in progress, the secure-aggregation round), hangs (a call or handler past its
limit, GetTask held past the server's long-poll cap); findings already known (tests/fuzzing.py
KNOWN); whether each aggregator still stops; wall time and cases/s. Exits 1 if any invariant
failed, known findings that break one included unless --allow-known.

    python -m bench.fuzz [--cases 10000] [--seed 0] [--allow-known] [--show 5]

--continuation-floods N instead measures the HTTP/2 header path: a raw TCP client sends the
connection preface and one request whose header block never ends: a HEADERS frame opening a
64 MiB header value, then CONTINUATION frames of 16 KiB until 64 MiB went out or the server
closed the connection; or ("fields") a header block of 64 MiB of tiny header fields. N floods
of each, one after the other, against an aggregator process with fedpt's defaults ([server]
max_metadata_bytes and the malloc_* keys) and one with grpc's and glibc's (all 0), side by side:
the aggregator's RSS before and after (each a trim period after start-up or the last flood), the MiB each flood
got through before the server hung up, and whether health still answers SERVING.

    python -m bench.fuzz --continuation-floods 10
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import grpc

from bench.common import print_table
from tests.fuzzing import (
    KNOWN,
    RPCS,
    STAGES,
    FuzzTarget,
    Outcome,
    SecureFederation,
    fuzz,
    open_calls,
    oversize_case,
    start_plain_target,
    stop_within,
    violation_kind,
)
from tests.http2_floods import continuation_flood

STAGE_RPCS = {
    "ADVERTISE": ("AdvertiseKeys", "GetSecAggState", "GetTask"),
    "SHARE": ("ShareKeys", "GetSecAggState"),
    "MASKED_INPUT": ("PushUpdate", "GetUploadStatus", "GetSecAggState"),
    "UNMASK": ("Unmask", "GetSecAggState"),
}
MAX_MESSAGE = 16 << 20  # ServerConfig.max_message_bytes


def plan(cases: int) -> list[tuple[str, str, int]]:
    """(target, rpc, cases): half plain text spread evenly, half over the secure stages."""
    out = []
    plain = cases // 2
    for i, rpc in enumerate(RPCS):
        out.append(("plain", rpc, plain // len(RPCS) + (i < plain % len(RPCS))))
    per_stage = (cases - plain) // len(STAGES)
    for stage in STAGES:
        weights = {rpc: 3 if rpc in STAGE_RPCS[stage] else 1 for rpc in RPCS}
        total = sum(weights.values())
        shares = {rpc: per_stage * w // total for rpc, w in weights.items()}
        shares[STAGE_RPCS[stage][0]] += per_stage - sum(shares.values())
        out += [(f"mtls:{stage}", rpc, n) for rpc, n in shares.items()]
    out[-1] = (out[-1][0], out[-1][1], out[-1][2] + cases - sum(n for *_, n in out))
    return out


class Tally:
    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], collections.Counter] = collections.defaultdict(
            collections.Counter
        )
        self.codes: collections.Counter = collections.Counter()
        self.known: collections.Counter = collections.Counter()
        self.examples: dict[str, Outcome] = {}
        self.violations: list[Outcome] = []
        self.broken: list[str] = []  # valid calls that failed after fuzzing

    def add(self, target: str, outcome: Outcome) -> None:
        row = self.rows[(target, outcome.case.rpc)]
        row["cases"] += 1
        row[outcome.case.kind] += 1
        row[outcome.code.name] += 1
        self.codes[outcome.code.name] += 1
        for finding in set(outcome.known):
            self.known[finding] += 1
            self.examples.setdefault(finding, outcome)
            row["known"] += 1
        for kind in {violation_kind(v) for v in outcome.violations}:
            row[kind] += 1
        if outcome.violations:
            self.violations.append(outcome)

    @property
    def cases(self) -> int:
        return sum(row["cases"] for row in self.rows.values())


def run_target(name: str, target: FuzzTarget, work: list, tally: Tally, seed: int) -> None:
    for index, (_, rpc, n) in enumerate(work):
        start = time.perf_counter()
        if n:
            fuzz(target, rpc, n, lambda o: tally.add(name, o), seed=seed * 1000 + index)
        tally.add(name, target.run(oversize_case(target.corpus, rpc, MAX_MESSAGE)))
        seconds = time.perf_counter() - start
        print(f"  {name:<18} {rpc:<16} {n + 1:>6} cases  {seconds:6.1f} s", flush=True)
    tally.broken += [f"{name}: a valid call failed after fuzzing:\n{p}" for p in target.sanity()]


# ---- HTTP/2 CONTINUATION floods ----------------------------------------------------------------
FLOOD_MIB = 64


def flood_aggregator(
    root: Path, server: dict, floods: int, shape: str
) -> tuple[int, int, list[int], bool]:
    """(RSS before, RSS after, MiB per flood, still SERVING) of one aggregator process."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from aggregator.config import ServerConfig
    from bench.aggregate import AggregatorProcess, free_port, status_bytes, toml_table

    # RSS is read once the aggregator has trimmed its heap (if it does) after start-up and floods
    settle = server.get("malloc_trim_seconds", ServerConfig(insecure=True).malloc_trim_seconds) + 2
    port = free_port()
    config = root / "aggregator.toml"
    sections = {"server": {"host": "127.0.0.1", "port": port, "insecure": True, **server},
                "federation": {"name": "bench-flood", "rounds": 1},
                "round": {"min_nodes": 100_000}, "store": {"state_dir": str(root / "state")}}  # fmt: skip
    config.write_text("\n".join(toml_table(k, v) for k, v in sections.items()))
    agg = AggregatorProcess(config, root / "aggregator.log", port)
    try:
        agg.wait_serving(120)
        time.sleep(settle)
        before = status_bytes(agg.pid, "VmRSS")
        taken = [continuation_flood(port, FLOOD_MIB, shape) >> 20 for _ in range(floods)]
        time.sleep(settle)
        after = status_bytes(agg.pid, "VmRSS")
        with grpc.insecure_channel(agg.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        return before, after, taken, reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        agg.stop()


def continuation_floods(floods: int) -> None:
    from aggregator.config import ServerConfig

    ours = ServerConfig(insecure=True)
    print(f"{floods} HTTP/2 CONTINUATION floods of {FLOOD_MIB} MiB each against an aggregator "
          "process (plain text), one with fedpt's defaults (header limit "
          f"{ours.max_metadata_bytes} B, {ours.malloc_arenas} malloc arenas, mmap threshold "
          f"{ours.malloc_mmap_threshold_bytes >> 20} MiB, trim every {ours.malloc_trim_seconds:g} s) "
          "and one with grpc's and glibc's (max_metadata_bytes, malloc_arenas, "
          "malloc_mmap_threshold_bytes, malloc_trim_seconds all 0); RSS read a trim period after "
          "start-up and after the last flood")  # fmt: skip
    glibc = {"max_metadata_bytes": 0, "malloc_arenas": 0, "malloc_mmap_threshold_bytes": 0,
             "malloc_trim_seconds": 0}  # fmt: skip
    settings = {"fedpt": {}, "grpc, glibc": glibc}
    rows = []
    for shape in ("value", "fields"):
        for label, server in settings.items():
            with tempfile.TemporaryDirectory(prefix="fedpt-flood-") as tmp:
                before, after, taken, serving = flood_aggregator(Path(tmp), server, floods, shape)
            rows.append([shape, label, f"{before / 2**20:.1f}", f"{after / 2**20:.1f}",
                     f"{(after - before) / 2**20:+.1f}", f"{statistics.median(taken):.0f}",
                         "yes" if serving else "NO"])  # fmt: skip
    print_table(["flood", "defaults", "RSS before MiB", "RSS after MiB", "growth MiB",
                 "MiB taken per flood (median)", "SERVING after"], rows)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", type=int, default=10_000, help="fuzzed cases in all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--allow-known", action="store_true",
                        help="exit 0 when the only failures are known findings")  # fmt: skip
    parser.add_argument("--show", type=int, default=5, help="violations to print in full")
    parser.add_argument("--continuation-floods", type=int, default=0,
                        help="measure this many HTTP/2 CONTINUATION floods instead")  # fmt: skip
    args = parser.parse_args()
    if args.continuation_floods:
        continuation_floods(args.continuation_floods)
        return
    # Uploads of huge finite values overflow in the accumulator and are then refused: expected.
    warnings.filterwarnings("ignore", "overflow encountered", RuntimeWarning)

    work = plan(args.cases)
    tally = Tally()
    stops: list[tuple[str, bool, int]] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedpt-fuzz-") as tmp:
        print(f"fuzzing {args.cases} cases (+{len(work)} oversized) with seed {args.seed}")
        plain = start_plain_target(Path(tmp) / "plain")
        run_target("plain", plain, [w for w in work if w[0] == "plain"], tally, args.seed)
        plain.close()
        calls = open_calls(plain.agg)
        stops.append(("plain", stop_within(plain.agg), calls))
        secure = SecureFederation(Path(tmp) / "mtls")
        for i, stage in enumerate(STAGES):
            target = secure.at(stage)
            stage_work = [w for w in work if w[0] == f"mtls:{stage}"]
            run_target(f"mtls:{stage}", target, stage_work, tally, args.seed + 7919 * (i + 1))
        calls = open_calls(secure.agg)
        stops.append(("mtls", secure.close(), calls))
    wall = time.perf_counter() - start

    print()
    columns = ["cases", "random", "mutated", "structured", "oversize", "OK", "known", "crash",
               "state", "hang", "other"]  # fmt: skip
    rows = [[target, rpc, *(row[c] for c in columns)] for (target, rpc), row in tally.rows.items()]
    totals = collections.Counter()
    for row in tally.rows.values():
        totals.update(row)
    rows.append(["all", "", *(totals[c] for c in columns)])
    print_table(["target", "rpc", *columns], rows)
    print()
    print_table(["status code", "cases"], sorted(tally.codes.items(), key=lambda kv: -kv[1]))
    print()
    for name, stopped, _ in stops:
        if not stopped:
            tally.broken.append(f"the {name} aggregator did not stop within 5 s")
    known_rows = [[k, n, "yes" if KNOWN[k].invariant else "no"] for k, n in tally.known.items()]
    header = ["known finding", "cases", "breaks an invariant"]
    print_table(header, known_rows or [["none", 0, ""]])
    for name, stopped, calls in stops:
        state = "stopped" if stopped else "did NOT stop within 5 s"
        print(f"{name} aggregator: {calls} server-side call(s) still open after fuzzing; {state}")
    for finding in tally.known:
        print(f"\n[{finding}] {KNOWN[finding].summary}")
        if finding in tally.examples:
            print("e.g. " + tally.examples[finding].report().replace("\n", "\n     "))
    for outcome in tally.violations[: args.show]:
        print("\nVIOLATION " + outcome.report())
    for problem in tally.broken:
        print("\nBROKEN " + problem)

    failed_known = [k for k in tally.known if KNOWN[k].invariant]
    failed = bool(tally.violations or tally.broken) or (bool(failed_known) and not args.allow_known)
    print()
    print(f"cases: {tally.cases} in {wall:.1f} s wall ({tally.cases / wall:.0f} cases/s, "
          "server start-up and round driving included)")  # fmt: skip
    print(f"crashes: {totals['crash']}, stored-state changes: {totals['state']}, "
          f"hangs: {totals['hang']}, other violations: {totals['other']}")  # fmt: skip
    print(f"known findings that break an invariant: {', '.join(failed_known) or 'none'}")
    print("RESULT: " + ("FAIL" if failed else "PASS"))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
