"""The coordinator: ``python -m bench [--quick]`` (``make bench`` / ``make bench-quick``).

It prepares the database, starts one worker process per configuration (see
``bench.worker``) and a PgBouncer, then runs, each phase interleaved across the
configurations (A B C ... A B C ..., the order rotated every round) so that drift of
the machine hits all of them alike:

1. micro: the raw pools (``bench.micro``) and, in every worker, one Django-level
   ``ensure_connection()`` + ``close_if_unusable_or_obsolete()``;
2. per-request overhead: one thread sending one-statement requests through Django's
   WSGI handler, in short batches interleaved across the configurations;
3. in-process: T = 1, 8, 32 threads on Django's WSGI handler, 4 server connections,
   one statement per request; then T = 8, 32 with five statements per request;
4. prepared statements: the same three ORM queries on every request (one thread in
   interleaved batches, then T = 8), for the psycopg 3 configurations, herokupool on psycopg 3
   with and without server-side prepared statements, and the references;
5. fairness: 32 threads on 4 connections with a 2 s pool timeout;
6. HTTP: gunicorn gthread (2 workers x 8 threads) and wrk on loopback.

Configurations marked ``prepared_only`` (herokupool on psycopg 3 with other psycopg options)
run in phase 4 only.

Results land in ``<out>/results.json``; ``bench.report`` writes ``results.md`` and
``bench.plot`` the PNG.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import dj_database_url

from bench import httprun
from bench.configs import CONFIGS, PREPARED, Config, Target, by_name
from bench.database import ConnectionWatcher, prepare_database, server_info
from devtools.pgbouncer import PgBouncer, find_pgbouncer

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/herokupool_bench"
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Plan:
    rounds: int = 3
    threads: tuple[int, ...] = (1, 8, 32)
    threads5: tuple[int, ...] = (8, 32)  # the five-statements-per-request windows
    threads_prepared: tuple[int, ...] = (8,)  # the prepared-statement windows
    warmup: float = 0.5
    duration: float = 3.0
    size: int = 4
    timeout: float = 10.0
    micro_repeats: int = 5
    micro_seconds: float = 0.2
    contended_seconds: float = 1.0
    django_micro_seconds: float = 0.3
    overhead_rounds: int = 12
    django_micro_rounds: int | None = None  # None: as many as ``rounds``
    overhead_seconds: float = 0.25
    fairness_threads: int = 32
    fairness_timeout: float = 2.0
    fairness_rounds: int = 1
    fairness_duration: float = 8.0
    http_rounds: int = 3
    http_workers: int = 2
    http_threads: int = 8
    http_connections: int = 32
    http_warmup: int = 1
    http_duration: int = 3


FULL = Plan()
QUICK = Plan(
    rounds=1,
    warmup=0.3,
    duration=1.0,
    micro_repeats=3,
    micro_seconds=0.1,
    contended_seconds=0.5,
    django_micro_seconds=0.2,
    overhead_rounds=4,
    overhead_seconds=0.15,
    fairness_duration=3.0,
    http_rounds=1,
    http_duration=2,
)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Worker:
    """One configuration's ``bench.worker`` process."""

    def __init__(self, config: Config, spec: dict[str, Any], pool_timeout: float) -> None:
        self.config = config
        env = {
            **os.environ,
            "BENCH_CONFIG": json.dumps(spec),
            "BENCH_POOL_TIMEOUT": str(pool_timeout),
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.worker"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )

    def command(self, **command: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.config.name} died (exit {self.process.wait()})")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"worker {self.config.name}: {reply['error']}")
        return reply

    def close(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(RuntimeError, BrokenPipeError, ValueError):
                self.command(op="quit")
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def rotated(items: tuple[Config, ...], by: int) -> list[Config]:
    if not items:
        return []
    by %= len(items)
    return [*items[by:], *items[:by]]


class Bench:
    def __init__(self, target: Target, configs: tuple[Config, ...], plan: Plan) -> None:
        self.target = target
        self.all_configs = configs
        #: Every phase but the prepared-statement one.
        self.configs = tuple(c for c in configs if not c.prepared_only)
        #: The prepared-statement phase.
        self.prepared = tuple(c for c in configs if c.prepared_only or c.name in PREPARED)
        self.plan = plan
        self.watcher = ConnectionWatcher(target)
        self.results: dict[str, Any] = {}

    # ---------------------------------------------------------------- helpers

    def specs(self, *, size: int, timeout: float, pgbouncer: PgBouncer | None) -> dict[str, Any]:
        port = pgbouncer.port if pgbouncer is not None else None
        return {
            c.name: c.spec(self.target, size=size, timeout=timeout, pgbouncer_port=port)
            for c in self.all_configs
        }

    def start_workers(
        self, configs: tuple[Config, ...], specs: dict[str, Any], timeout: float
    ) -> dict[str, Worker]:
        workers = {c.name: Worker(c, specs[c.name], timeout) for c in configs}
        for worker in workers.values():
            worker.command(op="ping")
        return workers

    def window(
        self,
        worker: Worker,
        threads: int,
        warmup: float,
        duration: float,
        statements: int = 1,
        workload: str | None = None,
    ) -> dict[str, Any]:
        name = worker.config.application_name
        self.watcher.wait_until_at_most(name, self.plan.size if worker.config.pooled else 0)
        with self.watcher.peak(name) as peak:
            result = worker.command(
                op="window",
                threads=threads,
                warmup=warmup,
                duration=duration,
                statements=statements,
                workload=workload,
            )
        ok = result["per_thread_ok"]
        result["rps"] = sum(ok) / duration
        result["starved_threads"] = sum(1 for count in ok if count == 0)
        result["peak_server_connections"] = peak["peak"]
        result["loadavg"] = round(os.getloadavg()[0], 2)
        return result

    # ----------------------------------------------------------------- phases

    def micro(self) -> None:
        log("micro: raw pools and reference units")
        dsn = (
            f"host={self.target.host} port={self.target.port} user={self.target.user} "
            f"dbname={self.target.dbname} application_name=bench-micro"
        )
        if self.target.password:
            dsn += f" password={self.target.password}"
        output = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.micro",
                "--dsn",
                dsn,
                "--repeats",
                str(self.plan.micro_repeats),
                "--seconds",
                str(self.plan.micro_seconds),
                "--contended-seconds",
                str(self.plan.contended_seconds),
            ],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        self.results["micro"] = json.loads(output)

    def main_run(self) -> None:
        plan = self.plan
        with self._pgbouncer(plan.size, plan.timeout) as bouncer:
            specs = self.specs(size=plan.size, timeout=plan.timeout, pgbouncer=bouncer)
            log(f"starting {len(self.all_configs)} workers")
            workers = self.start_workers(self.all_configs, specs, plan.timeout)
            try:
                log("micro: Django-level ensure_connection() + close_if_unusable_or_obsolete()")
                django_micro: dict[str, list[float]] = {c.name: [] for c in self.configs}
                for round_ in range(plan.django_micro_rounds or plan.rounds):
                    for config in rotated(self.configs, round_):
                        reply = workers[config.name].command(
                            op="micro", seconds=plan.django_micro_seconds
                        )
                        django_micro[config.name].append(reply["per_op"])
                self.results["django_micro"] = django_micro
                log("per-request overhead: one thread, one statement, interleaved batches")
                overhead: dict[str, list[dict[str, Any]]] = {c.name: [] for c in self.configs}
                for round_ in range(plan.overhead_rounds):
                    for config in rotated(self.configs, round_):
                        reply = workers[config.name].command(
                            op="requests", seconds=plan.overhead_seconds
                        )
                        reply["round"] = round_
                        overhead[config.name].append(reply)
                self.results["overhead"] = overhead
                for key, statements, thread_counts in (
                    ("inprocess", 1, plan.threads),
                    ("inprocess5", 5, plan.threads5),
                ):
                    inprocess: dict[str, dict[str, list[dict[str, Any]]]] = {
                        str(t): {c.name: [] for c in self.configs} for t in thread_counts
                    }
                    for round_ in range(plan.rounds):
                        for threads in thread_counts:
                            log(
                                f"in-process, {statements} statement(s) per request: "
                                f"round {round_ + 1}/{plan.rounds}, T={threads}"
                            )
                            for config in rotated(self.configs, round_):
                                result = self.window(
                                    workers[config.name],
                                    threads,
                                    plan.warmup,
                                    plan.duration,
                                    statements,
                                )
                                result["round"] = round_
                                inprocess[str(threads)][config.name].append(result)
                    self.results[key] = inprocess
                self.prepared_phase(workers)
            finally:
                for worker in workers.values():
                    worker.close()

    def prepared_phase(self, workers: dict[str, Worker]) -> None:
        """The prepared-statement workload: one thread in interleaved batches (as the
        per-request overhead micro), then windows at ``threads_prepared``."""
        plan = self.plan
        configs = self.prepared
        if not configs:
            return
        log("prepared statements: the same three ORM queries per request, one thread")
        single: dict[str, list[dict[str, Any]]] = {c.name: [] for c in configs}
        for round_ in range(plan.overhead_rounds):
            for config in rotated(configs, round_):
                reply = workers[config.name].command(
                    op="requests", seconds=plan.overhead_seconds, workload="prepared"
                )
                reply["round"] = round_
                single[config.name].append(reply)
        windows: dict[str, dict[str, list[dict[str, Any]]]] = {
            str(t): {c.name: [] for c in configs} for t in plan.threads_prepared
        }
        for round_ in range(plan.rounds):
            for threads in plan.threads_prepared:
                log(f"prepared statements: round {round_ + 1}/{plan.rounds}, T={threads}")
                for config in rotated(configs, round_):
                    result = self.window(
                        workers[config.name],
                        threads,
                        plan.warmup,
                        plan.duration,
                        workload="prepared",
                    )
                    result["round"] = round_
                    windows[str(threads)][config.name].append(result)
        self.results["prepared"] = {"single": single, "windows": windows}

    def fairness(self) -> None:
        plan = self.plan
        pooled = tuple(c for c in self.configs if c.pooled)
        if not pooled:
            return
        log(
            f"fairness: {plan.fairness_threads} threads, {plan.size} connections, "
            f"{plan.fairness_timeout:g} s pool timeout"
        )
        with self._pgbouncer(plan.size, plan.fairness_timeout) as bouncer:
            specs = self.specs(size=plan.size, timeout=plan.fairness_timeout, pgbouncer=bouncer)
            workers = self.start_workers(pooled, specs, plan.fairness_timeout)
            try:
                fairness: dict[str, list[dict[str, Any]]] = {c.name: [] for c in pooled}
                for round_ in range(plan.fairness_rounds):
                    for config in rotated(pooled, round_):
                        result = self.window(
                            workers[config.name],
                            plan.fairness_threads,
                            plan.warmup,
                            plan.fairness_duration,
                        )
                        result["round"] = round_
                        fairness[config.name].append(result)
                self.results["fairness"] = fairness
            finally:
                for worker in workers.values():
                    worker.close()

    def http_run(self) -> None:
        plan = self.plan
        log(
            f"HTTP: gunicorn gthread {plan.http_workers} workers x {plan.http_threads} threads, "
            f"{httprun.load_generator()} with {plan.http_connections} connections"
        )
        # PgBouncer gets the server connections all the workers' pools get together.
        with self._pgbouncer(plan.size * plan.http_workers, plan.timeout) as bouncer:
            specs = self.specs(size=plan.size, timeout=plan.timeout, pgbouncer=bouncer)
            results: dict[str, list[dict[str, Any]]] = {c.name: [] for c in self.configs}
            for round_ in range(plan.http_rounds):
                for config in rotated(self.configs, round_):
                    server = httprun.Gunicorn(
                        specs[config.name], workers=plan.http_workers, threads=plan.http_threads
                    )
                    try:
                        server.start()
                        httprun.load(
                            server.url, connections=plan.http_connections, seconds=plan.http_warmup
                        )
                        with self.watcher.peak(config.application_name) as peak:
                            result = httprun.load(
                                server.url,
                                connections=plan.http_connections,
                                seconds=plan.http_duration,
                            )
                    finally:
                        server.stop()
                    result["peak_server_connections"] = peak["peak"]
                    result["loadavg"] = round(os.getloadavg()[0], 2)
                    result["round"] = round_
                    results[config.name].append(result)
                    log(f"HTTP round {round_ + 1}: {config.name} {result['rps']:.0f} req/s")
            self.results["http"] = results

    def _pgbouncer(self, pool_size: int, wait_timeout: float) -> Any:
        if not any(c.via_pgbouncer for c in self.configs):
            return contextlib.nullcontext(None)
        return PgBouncer(
            self.target.host,
            self.target.port,
            pool_mode="transaction",
            default_pool_size=pool_size,
            max_client_conn=1000,
            users=(self.target.user,),
            password=self.target.password or None,
            settings={
                "query_wait_timeout": max(1, round(wait_timeout)),
                "log_connections": 0,
                "log_disconnections": 0,
            },
        )


def metadata_block(target: Target, plan: Plan, quick: bool, started: float) -> dict[str, Any]:
    versions = {}
    for package in (
        "Django",
        "psycopg2",
        "psycopg",
        "psycopg-pool",
        "SQLAlchemy",
        "django-db-connection-pool",
        "django-postgrespool2",
        "gunicorn",
        "herokupool",
    ):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    pgbouncer = find_pgbouncer()
    if pgbouncer:
        text = subprocess.run([pgbouncer, "--version"], capture_output=True, text=True).stdout
        versions["pgbouncer"] = text.split("\n", 1)[0].removeprefix("PgBouncer ").strip()
    if httprun.load_generator() == "wrk":
        text = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout
        versions["wrk"] = text.split()[1] if text else None
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "herokupool"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return {
        "quick": quick,
        "herokupool_commit": commit + ("+uncommitted changes" if dirty else ""),
        "plan": asdict(plan),
        "started": datetime.datetime.fromtimestamp(started, datetime.UTC).isoformat(
            timespec="seconds"
        ),
        "python": platform.python_version(),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_at_start": os.getloadavg(),
        },
        "server": server_info(target),
        "versions": versions,
        "configs": [
            {
                "name": c.name,
                "label": c.label,
                "driver": c.driver,
                "pooled": c.pooled,
                "note": c.note,
                "prepared_only": c.prepared_only,
            }
            for c in CONFIGS
        ],
    }


def target_from_url(url: str) -> Target:
    """The benchmark database a ``--database-url`` names."""
    parsed = dj_database_url.parse(url)
    return Target(
        host=parsed.get("HOST") or "127.0.0.1",
        port=int(parsed.get("PORT") or 5432),
        user=parsed.get("USER") or "postgres",
        dbname=parsed.get("NAME") or "herokupool_bench",
        password=parsed.get("PASSWORD") or "",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the short run (make bench-quick)")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL", DEFAULT_URL),
        help="the benchmark database (created if missing); default %(default)s",
    )
    parser.add_argument("--out", type=Path, help="output directory")
    parser.add_argument("--only", nargs="+", metavar="CONFIG", help="run only these configurations")
    parser.add_argument("--rounds", type=int, help="override the plan's rounds")
    parser.add_argument("--threads", type=int, nargs="+", help="override the plan's T values")
    parser.add_argument(
        "--threads5", type=int, nargs="*", help="override the five-statement T values"
    )
    parser.add_argument("--duration", type=float, help="override the in-process window (s)")
    parser.add_argument(
        "--overhead-rounds", type=int, help="override the per-request overhead micro's rounds"
    )
    parser.add_argument(
        "--micro-rounds", type=int, help="override the Django connect+close micro's rounds"
    )
    parser.add_argument(
        "--threads-prepared", type=int, nargs="*", help="override the prepared-statement T values"
    )
    parser.add_argument(
        "--skip", nargs="+", default=[], choices=["micro", "inprocess", "fairness", "http"]
    )
    args = parser.parse_args(argv)

    plan = QUICK if args.quick else FULL
    if args.rounds:
        plan = replace(plan, rounds=args.rounds)
    if args.threads:
        plan = replace(plan, threads=tuple(args.threads))
    if args.threads5 is not None:
        plan = replace(plan, threads5=tuple(args.threads5))
    if args.threads_prepared is not None:
        plan = replace(plan, threads_prepared=tuple(args.threads_prepared))
    if args.overhead_rounds:
        plan = replace(plan, overhead_rounds=args.overhead_rounds)
    if args.micro_rounds:
        plan = replace(plan, django_micro_rounds=args.micro_rounds)
    if args.duration:
        plan = replace(plan, duration=args.duration)
    out = args.out or (
        Path(os.environ.get("TMPDIR", "/tmp")) / "herokupool-bench-quick"
        if args.quick
        else ROOT / "bench" / "results"
    )
    out.mkdir(parents=True, exist_ok=True)
    target = target_from_url(args.database_url)
    configs = by_name(args.only)
    if find_pgbouncer() is None and any(c.via_pgbouncer for c in configs):
        log("pgbouncer is not installed: skipping that configuration (apt-get install pgbouncer)")
        configs = tuple(c for c in configs if not c.via_pgbouncer)

    started = time.time()
    log(f"load average {os.getloadavg()[0]:.2f}; preparing {target.dbname}")
    prepare_database(target)
    results: dict[str, Any] = {"meta": metadata_block(target, plan, args.quick, started)}
    bench = Bench(target, configs, plan)
    try:
        if "micro" not in args.skip:
            bench.micro()
        if "inprocess" not in args.skip:
            bench.main_run()
        if "fairness" not in args.skip:
            bench.fairness()
        if "http" not in args.skip:
            bench.http_run()
    finally:
        bench.watcher.close()
    results.update(bench.results)
    results["meta"]["elapsed_s"] = round(time.time() - started, 1)
    results["meta"]["loadavg_at_end"] = os.getloadavg()
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    log(f"wrote {path} in {results['meta']['elapsed_s']} s")

    from bench import report

    markdown = report.render(results)
    (out / "results.md").write_text(markdown)
    print(markdown)
    if not results.get("inprocess"):
        log("no plot: the in-process phase, which it draws, was skipped")
        return 0
    try:
        from bench import plot

        plot.render(results, out / "results.png")
        log(f"wrote {out / 'results.png'}")
    except ImportError as error:  # matplotlib missing: the table is still there
        log(f"no plot: {error}")
    return 0
