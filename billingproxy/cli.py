"""The ``billingproxy`` command. ``main(argv)`` parses and dispatches; the work lives elsewhere.

Every failure a person can cause or fix (bad setting, database down, port taken, unknown wallet)
ends as one line on stderr and exit status 2, never a traceback. Status 1 is a finding, not a
failure: a probe that found the pod unhealthy, an audit that found the books broken.

A command imports only what it runs: `probe` is kubelet's exec probe, one process start every few
seconds per pod, so the database layer (SQLAlchemy, Alembic, asyncpg) and the price map are
imported by the commands that use them, never at the top (tests/unit/test_cli_imports.py).
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from billing import errors, settings as settings_mod
from billingproxy import probe

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

EXIT_USAGE = 2
EXIT_PROBE_FAILED = 1
EXIT_AUDIT_MISMATCH = 1

T = TypeVar("T")


class CommandError(errors.UserFacingError):
    """Ends the command with this message and exit status 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="billingproxy",
        description="Prepaid-credit billing gateway for OpenAI-compatible LLM APIs.",
        epilog="Configuration comes from BILLINGPROXY_* environment variables and DATABASE_URL "
        "(see docs/configuration.md).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("up", help="run the whole stack locally: PostgreSQL, sidecar, Envoy, demo backend")
    sub.add_parser("sidecar", help="run the ext_authz sidecar (needs DATABASE_URL)")
    sub.add_parser("migrate", help="bring the database schema up to date")
    envoy = sub.add_parser("envoy-config", help="print the Envoy configuration rendered from the settings")
    envoy.add_argument("--backend-url", help="override BILLINGPROXY_BACKEND_URL")
    sub.add_parser("operator", help="run the Kubernetes operator (kopf)")
    probing = sub.add_parser(
        "probe",
        help="exit 0 when the sidecar and Envoy in this pod answer as healthy (Kubernetes exec probes); "
        "`drain` is the pod's preStop",
    )
    probing.add_argument(
        "checks",
        nargs="+",
        choices=[*probe.CHECKS, "drain"],
        metavar="CHECK",
        help=f"one or more of {', '.join(probe.CHECKS)}; or drain",
    )
    probing.add_argument(
        "--within",
        type=float,
        default=30.0,
        help="drain: seconds to wait for requests in flight (default 30)",
    )

    wallet = sub.add_parser(
        "wallet", help="show, credit or set the overdraft limit of a wallet"
    ).add_subparsers(dest="action", required=True, metavar="ACTION")
    show = wallet.add_parser("show", help="balance, state and keys of a wallet")
    show.add_argument("wallet", help="wallet id (wal_…) or owner email")
    credit = wallet.add_parser("credit", help="credit a wallet by hand (idempotent on --reference)")
    credit.add_argument("wallet", help="wallet id (wal_…) or owner email")
    credit.add_argument("amount_usd", help='amount in USD, e.g. "10.00"')
    credit.add_argument(
        "--reference",
        required=True,
        help="a unique reference (ticket id…): the same reference never credits twice",
    )
    overdraft = wallet.add_parser(
        "set-overdraft", help="how far below zero the balance may go (0: never below zero)"
    )
    overdraft.add_argument("wallet", help="wallet id (wal_…) or owner email")
    overdraft.add_argument("limit_usd", help='limit in USD, e.g. "1.00"; "0" for none')

    key = sub.add_parser("key", help="create, revoke or cap API keys").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    create = key.add_parser("create", help="issue a new key for a wallet (shown once)")
    create.add_argument("wallet", help="wallet id (wal_…) or owner email")
    create.add_argument(
        "--model",
        action="append",
        dest="models",
        help="allow only this model (repeat for several); default: any priced model",
    )
    revoke = key.add_parser("revoke", help="revoke a key; refused by the gateway within a second")
    revoke.add_argument("key_id", help="key id (key_…)")
    capping = key.add_parser("limit", help="cap what a key may spend per window (docs/architecture.md)")
    capping.add_argument("key_id", help="key id (key_…)")
    capping.add_argument("usd", nargs="?", help='limit in USD, e.g. "5.00" (omit with --clear)')
    capping.add_argument(
        "--window",
        default="monthly",
        help="daily, weekly, monthly (calendar, UTC) or total (default: monthly)",
    )
    capping.add_argument("--clear", action="store_true", help="remove the key's limit")

    reconcile = sub.add_parser(
        "reconcile",
        help="settle requests from Envoy's JSON access log "
        "(those the gRPC access log never delivered); idempotent",
    )
    reconcile.add_argument(
        "log",
        help="Envoy's JSON access-log file (<data dir>/access-log/access.log or its rotated access.log.1; "
        "other lines are skipped), or - for stdin",
    )

    auditing = sub.add_parser(
        "audit",
        help="check every wallet's books, read-only in one snapshot (safe on a live database); "
        "exit 1 on any mismatch",
    )
    auditing.add_argument("--json", action="store_true", help="print the report as JSON")

    usage = sub.add_parser("usage", help="ledger entries of a wallet, newest first")
    usage.add_argument("wallet", help="wallet id (wal_…) or owner email")
    usage.add_argument("--limit", type=int, default=20, help="entries to show (default 20)")
    return parser


def _database_url(settings: settings_mod.Settings) -> str:
    """DATABASE_URL, or the URL of the database a running `billingproxy up` started."""
    if settings.database_url:
        return settings.database_url
    from billingproxy.devstack import local_stack  # noqa: PLC0415 (only needed without DATABASE_URL)

    url = local_stack.running_database_url(settings)
    if url is None:
        raise CommandError(
            "no database: set DATABASE_URL, or start the local stack with `billingproxy up` (or `make up`)"
        )
    return url


def _on_database(settings: settings_mod.Settings, work: Callable[[AsyncEngine], Awaitable[T]]) -> T:
    """Run ``work`` with an engine of one connection over the command's database."""
    import asyncio  # noqa: PLC0415 (a command imports only what it runs)

    from billing import database  # noqa: PLC0415 (a command imports only what it runs)

    url = _database_url(settings)

    async def go() -> T:
        engine = database.create_engine(url, pool_size=1)
        try:
            return await work(engine)
        finally:
            await engine.dispose()

    return asyncio.run(go())


def _admin(command: Callable[..., Awaitable[str]], *args: object) -> Callable[[settings_mod.Settings], int]:
    def run(settings: settings_mod.Settings) -> int:
        async def in_transaction(engine: AsyncEngine) -> str:
            async with engine.begin() as conn:
                return await command(conn, *args)

        print(_on_database(settings, in_transaction))
        return 0

    return run


def _dispatch(args: argparse.Namespace, settings: settings_mod.Settings) -> int:
    if args.command == "probe":
        return _probe(args, settings)
    # Every command below uses the database or the price map.
    import asyncio  # noqa: PLC0415 (a command imports only what it runs)

    from billing import database, pricing  # noqa: PLC0415 (a command imports only what it runs)
    from billingproxy import admin_commands  # noqa: PLC0415 (a command imports only what it runs)

    if args.command == "up":
        from billingproxy.devstack import local_stack  # noqa: PLC0415 (a command imports only what it runs)

        return local_stack.main(settings)
    if args.command == "sidecar":
        from authz_sidecar import server  # noqa: PLC0415 (a command imports only what it runs)

        settings = settings.replace(database_url=_database_url(settings))
        prices = pricing.load(settings.price_overrides_path, settings.markup_percent)
        server.serve(settings, prices)
        return 0
    if args.command == "migrate":
        database.migrate(_database_url(settings))
        print("database schema is up to date")
        return 0
    if args.command == "envoy-config":
        from authz_sidecar import envoy_config  # noqa: PLC0415 (a command imports only what it runs)

        backend = args.backend_url or settings.backend_url
        if not backend:
            raise CommandError("no backend: set BILLINGPROXY_BACKEND_URL or pass --backend-url")
        sys.stdout.write(envoy_config.render_yaml(settings, backend_url=backend))
        return 0
    if args.command == "operator":
        return run_operator(settings)
    if args.command == "wallet" and args.action == "show":
        return _admin(admin_commands.wallet_show, args.wallet)(settings)
    if args.command == "wallet" and args.action == "credit":
        return _admin(admin_commands.wallet_credit, args.wallet, args.amount_usd, args.reference)(settings)
    if args.command == "wallet" and args.action == "set-overdraft":
        return _admin(admin_commands.wallet_set_overdraft, args.wallet, args.limit_usd)(settings)
    if args.command == "key" and args.action == "create":
        return _admin(admin_commands.key_create, args.wallet, args.models)(settings)
    if args.command == "key" and args.action == "revoke":
        return _admin(admin_commands.key_revoke, args.key_id)(settings)
    if args.command == "key" and args.action == "limit":
        if args.clear == (args.usd is not None):
            raise CommandError("give either a limit in USD or --clear")
        return _admin(admin_commands.key_limit, args.key_id, args.usd, args.window)(settings)
    if args.command == "reconcile":
        from billingproxy import reconcile  # noqa: PLC0415 (a command imports only what it runs)

        lines = _read_lines(args.log)
        prices = pricing.load(settings.price_overrides_path, settings.markup_percent)
        print(asyncio.run(reconcile.reconcile(_database_url(settings), prices, lines)))
        return 0
    if args.command == "audit":
        from billing import audit  # noqa: PLC0415 (a command imports only what it runs)

        report = _on_database(
            settings, functools.partial(audit.run, report_grace_s=settings.hold_report_grace_s)
        )
        print(admin_commands.audit_json(report) if args.json else admin_commands.audit_table(report))
        return 0 if report.clean else EXIT_AUDIT_MISMATCH
    if args.command == "usage":
        if not 1 <= args.limit <= 1000:
            raise CommandError("--limit must be between 1 and 1000")
        return _admin(admin_commands.usage, args.wallet, args.limit)(settings)
    raise AssertionError(f"unhandled command {args.command}")


def run_operator(settings: settings_mod.Settings) -> int:
    """`billingproxy operator`: ``kopf run -m billing_operator`` with the namespaces, peering and
    liveness endpoint taken from ``BILLINGPROXY_OPERATOR_*`` (docs/operator.md) instead of kopf's
    flags. Stops on SIGINT/SIGTERM."""
    # Lazy on purpose: kopf reads the status timer's interval when billing_operator is imported.
    import asyncio  # noqa: PLC0415 (a command imports only what it runs)

    from billing_operator import runner, settings as operator_settings  # noqa: PLC0415 (see the line above)

    asyncio.run(runner.run(operator_settings.from_env(settings=settings)))
    return 0


def _probe(args: argparse.Namespace, settings: settings_mod.Settings) -> int:
    if "drain" in args.checks:
        if args.checks != ["drain"]:
            raise CommandError("drain is run alone")
        if not 0 < args.within <= 3600:
            raise CommandError("--within must be between 0 and 3600 seconds")
        try:
            unfinished = probe.drain(settings, args.within)
        except probe.ProbeFailed as exc:
            print(f"billingproxy probe: {exc}", file=sys.stderr)
            return EXIT_PROBE_FAILED
        for line in unfinished:
            print(f"billingproxy probe drain: {line}", file=sys.stderr)
        return 0
    try:
        probe.run(settings, args.checks)
    except probe.ProbeFailed as exc:
        print(f"billingproxy probe: {exc}", file=sys.stderr)
        return EXIT_PROBE_FAILED
    return 0


def _read_lines(path: str) -> list[str]:
    if path == "-":
        return sys.stdin.read().splitlines()
    try:
        with open(path, encoding="utf-8", errors="replace") as log:
            return log.read().splitlines()
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror}") from None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = settings_mod.from_env()
        logging.basicConfig(
            level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        # Alembic, imported by the commands that use the database (after this), logs each of its
        # plugins as it loads them: noise on every command's stderr, whose failures are one line.
        logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
        return _dispatch(args, settings)
    except errors.UserFacingError as exc:
        print(f"billingproxy: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from billingproxy import startup_errors  # noqa: PLC0415 (it imports the database layer)

        explained = startup_errors.explain(exc)
        if explained is None:
            raise
        print(f"billingproxy: {explained}", file=sys.stderr)
        return EXIT_USAGE
