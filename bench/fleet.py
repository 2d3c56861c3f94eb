"""Fleet sizing, measured: N worker processes with a herokupool pool each against a plan-like
connection limit, directly and through PgBouncer in transaction mode.

``make fleet`` (``python -m bench.fleet``) stands in for many dynos on one machine, loopback
only:

- a private PostgreSQL with ``max_connections = 20`` (Heroku Postgres Essential-0's limit) and
  ``superuser_reserved_connections = 3``; the harness's superuser sampler holds one slot, so the
  application role ``app`` can hold 16 connections.  Every role authenticates with the cluster's
  password (SCRAM-SHA-256), PgBouncer too;
- for each N in 2, 8, 32: N processes, each a stand-in for a gunicorn worker: THREADS threads
  sharing one ``herokupool.ConnectionPool`` with ``max_conns = MAX_CONNS``; each thread loops
  over "requests": THINK seconds of non-database work (a sleep, jittered), then borrow, a
  QUERY-second query (``pg_sleep``), release;
- (a) every process connects to PostgreSQL directly; (b) every process connects to a private
  PgBouncer (transaction mode, ``default_pool_size = BOUNCER_POOL``) in front of the same server;
- while a run lasts, a sampler counts the server's ``app`` sessions in ``pg_stat_activity``.

Per run: requests/s that succeeded, p50/p99 latency of a request's database part (borrow +
query + release), errors by kind ("too many clients", pool timeout, other), the most server
connections seen, and the pools' own figures (waits, failed connects, the worst wait p99 of
the new metrics window).  Results go to ``docs/fleet.json``, ``docs/fleet.png`` and the table
in ``docs/fleet.md`` (between its ``fleet:results`` markers); ``--quick`` runs N = 2, 4 for 3 s
each and writes nothing unless ``--out`` is given.

Bounded: every worker stops at its deadline and is killed 30 s after it; servers listen on
127.0.0.1 only and are removed at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

#: The plan-like limit and what it leaves the application role.
MAX_CONNECTIONS = 20
RESERVED = 3
# PostgreSQL admits a non-superuser while more than RESERVED slots are free, and the harness's
# sampler holds one slot: the application can hold MAX_CONNECTIONS - RESERVED - 1 = 16.
APP_LIMIT = MAX_CONNECTIONS - RESERVED - 1
#: PgBouncer's server connections: under APP_LIMIT, leaving room for a release or one-off dyno.
BOUNCER_POOL = 15
#: One process: gunicorn threads and POOL_MAX_CONNS.
THREADS = 4
MAX_CONNS = 2
POOL_TIMEOUT = 5.0
#: A request: THINK s of application work (jittered +-50 %), then a QUERY s query.
THINK = 0.05
QUERY = 0.002
PROCESSES = (2, 8, 32)
SECONDS = 8.0
#: Seconds each run goes on before anything is counted.
WARMUP = 1.0
#: Each (mode, N) runs this many times, interleaved; the table shows the median run.
ROUNDS = 3
APP_USER = "app"
DBNAME = "fleet"
MODES = ("direct", "pgbouncer")

_TOO_MANY = re.compile(r"too many clients|remaining connection slots are reserved", re.I)


# --------------------------------------------------------------------------- worker process


def classify(error: BaseException) -> str:
    from herokupool.errors import PoolTimeout

    if isinstance(error, PoolTimeout):
        return "pool timeout"
    text = str(error).strip()
    if _TOO_MANY.search(text):
        return "too many clients"
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"[:120]


def worker(args: argparse.Namespace) -> int:
    """One stand-in for a gunicorn worker: prints one JSON object, then exits."""
    import psycopg2

    from herokupool.pool import ConnectionPool

    # Failed connects are counted below; 32 processes logging each one would flood the run.
    logging.getLogger("herokupool").setLevel(logging.CRITICAL)

    def connect() -> Any:
        conn = psycopg2.connect(args.dsn, connect_timeout=5, application_name="fleet")
        conn.autocommit = True
        return conn

    pool = ConnectionPool(
        connect, name="fleet", max_conns=args.max_conns, timeout=args.pool_timeout
    )
    # The first WARMUP seconds open the connections (and PgBouncer its server connections, one
    # at a time): they run but are not counted, so the figures describe the steady state.
    counted_from = args.start_at + args.warmup
    end = counted_from + args.seconds
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    lock = threading.Lock()

    def loop(seed: int) -> None:
        rng = random.Random(seed)
        time.sleep(max(args.start_at - time.time(), 0.0) + rng.random() * args.think)
        while True:
            time.sleep(args.think * (0.5 + rng.random()))
            now = time.time()
            if now >= end:
                return
            counted = now >= counted_from
            started = time.perf_counter()
            try:
                conn = pool.borrow()
                try:
                    with conn.cursor() as cursor:
                        cursor.execute("SELECT pg_sleep(%s)", [args.query])
                finally:
                    pool.release(conn)
            except Exception as error:
                if counted:
                    with lock:
                        errors[classify(error)] += 1
                continue
            if counted:
                with lock:
                    latencies.append(time.perf_counter() - started)

    threads = [
        threading.Thread(target=loop, args=(os.getpid() * 1000 + n,), daemon=True)
        for n in range(args.threads)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(args.warmup + args.seconds + 60)
    stats = pool.stats()
    pool.close()
    json.dump(
        {"pid": os.getpid(), "latencies": latencies, "errors": dict(errors), "stats": stats},
        sys.stdout,
    )
    sys.stdout.write("\n")
    return 0


# --------------------------------------------------------------------------- the harness


class Sampler(threading.Thread):
    """Counts the app role's server sessions every 20 ms (as superuser: a reserved slot)."""

    def __init__(self, admin_dsn: str) -> None:
        super().__init__(daemon=True)
        self.admin_dsn = admin_dsn
        self.peak = 0
        self.samples: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        import psycopg2

        conn = psycopg2.connect(self.admin_dsn)
        conn.autocommit = True
        try:
            with conn.cursor() as cursor:
                while not self.stop.is_set():
                    cursor.execute(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE usename = %s AND backend_type = 'client backend'",
                        [APP_USER],
                    )
                    count = int(cursor.fetchone()[0])
                    self.samples.append(count)
                    self.peak = max(self.peak, count)
                    self.stop.wait(0.02)
        finally:
            conn.close()


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(fraction * len(ordered) + 0.999999) - 1))]


def run_cell(mode: str, processes: int, dsn: str, admin_dsn: str, seconds: float) -> dict[str, Any]:
    """N processes for ``seconds``; their merged figures."""
    # Room for N interpreters to start on 2 cores before the common start.
    start_at = time.time() + 1.5 + 0.12 * processes
    command = [
        sys.executable, "-m", "bench.fleet", "worker", "--dsn", dsn,
        "--start-at", repr(start_at), "--seconds", repr(seconds), "--warmup", repr(WARMUP),
        "--threads", str(THREADS), "--max-conns", str(MAX_CONNS),
        "--pool-timeout", repr(POOL_TIMEOUT), "--think", repr(THINK), "--query", repr(QUERY),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    sampler = Sampler(admin_dsn)
    sampler.start()
    children = [
        subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(processes)
    ]
    results = []
    deadline = start_at + WARMUP + seconds + 30
    for child in children:
        try:
            out, _ = child.communicate(timeout=max(deadline - time.time(), 1))
        except subprocess.TimeoutExpired:
            child.kill()
            out, _ = child.communicate()
        if child.returncode == 0 and out.strip():
            results.append(json.loads(out))
    sampler.stop.set()
    sampler.join()
    latencies = [value for result in results for value in result["latencies"]]
    errors: Counter[str] = Counter()
    for result in results:
        errors.update(result["errors"])
    stats = [result["stats"] for result in results]
    total = len(latencies) + sum(errors.values())
    return {
        "mode": mode,
        "processes": processes,
        "seconds": seconds,
        "workers_reported": len(results),
        "requests": total,
        "ok": len(latencies),
        "rps": round(len(latencies) / seconds, 1),
        "p50_ms": _ms(percentile(latencies, 0.50)),
        "p99_ms": _ms(percentile(latencies, 0.99)),
        "errors": dict(errors.most_common()),
        "error_share": round(sum(errors.values()) / total, 4) if total else 0.0,
        "peak_server_connections": sampler.peak,
        "pool_max_total": processes * MAX_CONNS,
        "pool_waits": sum(int(s["waits"]) for s in stats),
        "pool_connections_failed": sum(int(s["connections_failed"]) for s in stats),
        "pool_wait_p99_ms_worst": _ms(max((float(s["wait_p99"]) for s in stats), default=None)),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 2)


def _admin_execute(dsn: str, sql: str, params: list[Any]) -> None:
    import psycopg2

    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cursor:
            cursor.execute(sql, params)
    finally:
        conn.close()


def _settle(admin_dsn: str, timeout: float = 15.0) -> None:
    """Wait until no app session is left from the previous run (direct mode)."""
    import psycopg2

    conn = psycopg2.connect(admin_dsn)
    conn.autocommit = True
    try:
        deadline = time.monotonic() + timeout
        with conn.cursor() as cursor:
            while time.monotonic() < deadline:
                cursor.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = %s", [APP_USER]
                )
                if int(cursor.fetchone()[0]) == 0:
                    return
                time.sleep(0.1)
    finally:
        conn.close()


def run(processes: list[int], seconds: float, rounds: int, say: Any) -> dict[str, Any]:
    from devtools.pgbouncer import PgBouncer
    from devtools.pgcluster import PostgresCluster

    tmp = tempfile.mkdtemp(prefix="hp-fleet-")
    os.chmod(tmp, 0o755)  # the server and pgbouncer may run as another user
    cluster = PostgresCluster(
        Path(tmp) / "pg",
        extra_conf={
            "max_connections": str(MAX_CONNECTIONS),
            "superuser_reserved_connections": str(RESERVED),
        },
    )
    runs: list[dict[str, Any]] = []
    bouncer = None
    try:
        cluster.init()
        cluster.start()
        # The app's role authenticates like the superuser (scram-sha-256), with the cluster's
        # password, so PgBouncer can log in as either with the one password it is given: every
        # connect pays a SCRAM exchange, as on Heroku Postgres, refused ones included.
        password = cluster.password
        _admin_execute(cluster.dsn(), f"CREATE ROLE {APP_USER} LOGIN PASSWORD %s", [password])
        cluster.create_database(DBNAME)
        # PgBouncer closes its server connections 1 s after they go idle, so a direct run that
        # follows a PgBouncer run starts with every slot free (see _settle).
        bouncer = PgBouncer(
            "127.0.0.1",
            cluster.port,
            pool_mode="transaction",
            default_pool_size=BOUNCER_POOL,
            max_client_conn=max(processes) * MAX_CONNS + 50,
            users=(APP_USER, "postgres"),
            password=password,
            settings={"server_idle_timeout": "1"},
            parent_dir=tmp,
        )
        bouncer.start()
        say(
            f"PostgreSQL on port {cluster.port}: max_connections {MAX_CONNECTIONS}, "
            f"{APP_LIMIT} for {APP_USER!r}; PgBouncer on port {bouncer.port}: transaction "
            f"mode, {BOUNCER_POOL} server connections"
        )
        admin = cluster.dsn(DBNAME)
        direct = (
            f"postgresql://{APP_USER}:{quote(password, safe='')}@127.0.0.1:{cluster.port}/{DBNAME}"
        )
        dsns = {"direct": direct, "pgbouncer": bouncer.dsn(DBNAME, user=APP_USER)}
        for round_ in range(1, rounds + 1):
            for n in processes:
                for mode in MODES:
                    _settle(admin)
                    cell = run_cell(mode, n, dsns[mode], admin, seconds)
                    cell["round"] = round_
                    say(f"round {round_}/{rounds} " + _line(cell))
                    runs.append(cell)
    finally:
        try:
            if bouncer is not None:
                bouncer.stop()
            cluster.stop(mode="fast")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return {
        "meta": {
            "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_average": [round(x, 1) for x in os.getloadavg()],
            "max_connections": MAX_CONNECTIONS,
            "superuser_reserved_connections": RESERVED,
            "app_limit": APP_LIMIT,
            "bouncer_pool": BOUNCER_POOL,
            "threads": THREADS,
            "max_conns": MAX_CONNS,
            "pool_timeout": POOL_TIMEOUT,
            "think_s": THINK,
            "query_s": QUERY,
            "seconds": seconds,
            "warmup_s": WARMUP,
            "rounds": rounds,
        },
        "runs": runs,
        "summary": summarize(runs),
    }


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (mode, N): the median over the rounds of each figure (errors per kind too), the
    rounds' range of requests/s and p99, and the most server connections any round saw."""
    cells = []
    for mode in MODES:
        for n in sorted({run["processes"] for run in runs}):
            mine = [r for r in runs if r["mode"] == mode and r["processes"] == n]
            if not mine:
                continue
            cell: dict[str, Any] = {"mode": mode, "processes": n, "rounds": len(mine)}
            cell["pool_max_total"] = mine[0]["pool_max_total"]
            for key in ("rps", "p50_ms", "p99_ms", "error_share", "pool_wait_p99_ms_worst"):
                values = [r[key] for r in mine if r.get(key) is not None]
                cell[key] = statistics.median(values) if values else None
            kinds = sorted({kind for r in mine for kind in r["errors"]})
            cell["errors"] = {
                kind: statistics.median(r["errors"].get(kind, 0) for r in mine) for kind in kinds
            }
            cell["rps_range"] = [min(r["rps"] for r in mine), max(r["rps"] for r in mine)]
            p99s = [r["p99_ms"] for r in mine if r["p99_ms"] is not None]
            cell["p99_ms_range"] = [min(p99s), max(p99s)] if p99s else None
            cell["peak_server_connections"] = max(r["peak_server_connections"] for r in mine)
            cells.append(cell)
    return cells


def _line(cell: dict[str, Any]) -> str:
    errors = ", ".join(f"{k}: {v}" for k, v in cell["errors"].items()) or "none"
    return (
        f"{cell['mode']:>9} N={cell['processes']:<3} {cell['rps']:>7.1f} req/s  "
        f"p99 {cell['p99_ms']} ms  errors {errors}  server connections at peak "
        f"{cell['peak_server_connections']} (pools could open {cell['pool_max_total']})"
    )


# --------------------------------------------------------------------------- reporting


def table(results: dict[str, Any]) -> str:
    header = (
        "| mode | processes | pools could open | requests/s (range) | p50 ms | p99 ms (range) | "
        "errors per run | failed | server connections at peak |"
    )
    lines = [header, "|---|--:|--:|--:|--:|--:|---|--:|--:|"]
    for cell in results["summary"]:
        errors = ", ".join(f"{v:,.0f} {k}" for k, v in cell["errors"].items() if v) or "none"
        low, high = cell["rps_range"]
        p99_low, p99_high = cell["p99_ms_range"] or (None, None)
        lines.append(
            f"| {'PostgreSQL directly' if cell['mode'] == 'direct' else 'PgBouncer (transaction)'} "
            f"| {cell['processes']} | {cell['pool_max_total']} "
            f"| {cell['rps']:,.0f} ({low:,.0f}-{high:,.0f}) | {_num(cell['p50_ms'])} "
            f"| {_num(cell['p99_ms'])} ({_num(p99_low)}-{_num(p99_high)}) | {errors} "
            f"| {cell['error_share'] * 100:.1f}% | {cell['peak_server_connections']} |"
        )
    return "\n".join(lines) + "\n"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = results["meta"]
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.8))
    colours = {"direct": "#dc2626", "pgbouncer": "#4f46e5"}
    labels = {"direct": "PostgreSQL directly", "pgbouncer": "PgBouncer (transaction)"}
    for mode in MODES:
        cells = [c for c in results["summary"] if c["mode"] == mode]
        if not cells:
            continue
        n = [c["processes"] for c in cells]
        kwargs = {"color": colours[mode], "marker": "o", "label": labels[mode]}
        axes[0].plot(n, [c["rps"] for c in cells], **kwargs)
        axes[1].plot(n, [c["p99_ms"] or 0 for c in cells], **kwargs)
        axes[2].plot(n, [c["error_share"] * 100 for c in cells], **kwargs)
        axes[3].plot(n, [c["peak_server_connections"] for c in cells], **kwargs)
    axes[3].axhline(meta["app_limit"], color="#6b7280", linestyle="--", linewidth=1)
    axes[3].text(2, meta["app_limit"] - 1.5, f"the app's share ({meta['app_limit']})", fontsize=8)
    titles = (
        "successful requests/s",
        "p99 of borrow + query, ms",
        "failed requests (%)",
        "server connections at peak",
    )
    for axis, title in zip(axes, titles, strict=True):
        axis.set_title(title, fontsize=10)
        axis.set_xscale("log", base=2)
        axis.set_xticks(sorted({c["processes"] for c in results["summary"]}))
        axis.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.set_xlabel("worker processes (N)")
        axis.grid(alpha=0.3)
        axis.set_ylim(bottom=0)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"{THREADS} threads x POOL_MAX_CONNS={MAX_CONNS} per process, max_connections "
        f"{meta['max_connections']} ({meta['app_limit']} for the app), PgBouncer pool "
        f"{meta['bouncer_pool']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


START = "<!-- fleet:results -->"
END = "<!-- /fleet:results -->"


def write(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "fleet.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    plot(results, out / "fleet.png")
    doc = out / "fleet.md"
    meta = results["meta"]
    block = (
        f"{START}\nRun of {meta['started']} on {meta['cpus']} CPUs (load average at the end "
        f"{meta['load_average'][0]:g}), Python {meta['python']}; each figure is the median of "
        f"{meta['rounds']} interleaved runs of {meta['seconds']:g} s (the range in brackets), the "
        f"server connections the most any run saw:\n\n{table(results)}{END}"
    )
    if doc.exists():
        text = doc.read_text(encoding="utf-8")
        if START in text and END in text:
            before, rest = text.split(START, 1)
            after = rest.split(END, 1)[1]
            doc.write_text(before + block + after, encoding="utf-8")
            return
    doc.write_text(f"# Fleet sizing\n\n{block}\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fleet", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command")
    w = sub.add_parser("worker", help="internal: one worker process")
    w.add_argument("--dsn", required=True)
    w.add_argument("--start-at", type=float, required=True)
    w.add_argument("--seconds", type=float, required=True)
    w.add_argument("--warmup", type=float, default=WARMUP)
    w.add_argument("--threads", type=int, default=THREADS)
    w.add_argument("--max-conns", type=int, default=MAX_CONNS)
    w.add_argument("--pool-timeout", type=float, default=POOL_TIMEOUT)
    w.add_argument("--think", type=float, default=THINK)
    w.add_argument("--query", type=float, default=QUERY)
    parser.add_argument("--quick", action="store_true", help="N = 2, 4 for 3 s each")
    parser.add_argument("--processes", help="comma-separated N (default 2,8,32)")
    parser.add_argument("--seconds", type=float, help=f"per run (default {SECONDS:g})")
    parser.add_argument("--rounds", type=int, help=f"runs per row (default {ROUNDS})")
    parser.add_argument(
        "--out", type=Path, help="where to write (default docs/, none with --quick)"
    )
    parser.add_argument(
        "--report", type=Path, help="rebuild the table and plot from a fleet.json; run nothing"
    )
    args = parser.parse_args(argv)
    if args.command == "worker":
        return worker(args)
    if args.report is not None:
        results = json.loads(args.report.read_text(encoding="utf-8"))
        results["summary"] = summarize(results["runs"])
        sys.stdout.write(table(results))
        write(results, args.out or args.report.parent)
        return 0
    processes = (
        [int(n) for n in args.processes.split(",")]
        if args.processes
        else ([2, 4] if args.quick else list(PROCESSES))
    )
    if max(processes) * MAX_CONNS + 50 > 1000 or max(processes) > 64:
        parser.error("at most 64 processes: this is a bounded run on one machine")
    seconds = args.seconds or (3.0 if args.quick else SECONDS)

    def say(message: str) -> None:
        sys.stderr.write(f"fleet: {message}\n")
        sys.stderr.flush()

    rounds = args.rounds or (1 if args.quick else ROUNDS)
    results = run(processes, seconds, rounds, say)
    sys.stdout.write(table(results))
    out = args.out or (None if args.quick else DOCS)
    if out is not None:
        write(results, out)
        say(f"wrote {out / 'fleet.json'}, {out / 'fleet.png'} and the table in {out / 'fleet.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
