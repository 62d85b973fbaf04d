"""The PostgreSQL schema, as SQLAlchemy Core tables (Alembic migrations create it; see migrations/).

The money: ``wallets`` (balance and reservations of record), ``api_keys`` (hashes only),
``ledger_entries`` (immutable, one per balance change, unique idempotency key) and ``holds``
(two-phase reservations: pending → posted | voided, exactly once; ``expired``: released at its
TTL by an earlier version, and posted or voided from there). Stripe's facts, which
the ledger's top-ups, refunds and disputes follow (billing/payments.py): ``stripe_events``,
``stripe_checkout_sessions``, ``stripe_payments`` and ``stripe_disputes``.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

metadata = sa.MetaData()

_now = sa.text("now()")

wallets = sa.Table(
    "wallets",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("email", sa.Text, nullable=True),
    # Who owns the row: "signup" (self-service), "kubernetes" (a Wallet resource), "admin".
    sa.Column("source", sa.Text, nullable=False),
    # The owning object's identity outside the database (a Wallet resource's UID), if any.
    sa.Column("external_id", sa.Text, nullable=True, unique=True),
    sa.Column("balance_nano", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("reserved_nano", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("suspended", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
    # The Stripe customer a Wallet resource declares (migration 0002): kept as declared; top-ups
    # neither read nor set it.
    sa.Column("stripe_customer_id", sa.Text, nullable=True),
    # Set by billing/payments.py while the wallet has an open dispute (migration 0003).
    sa.Column("disputed", sa.Boolean, nullable=False, server_default=sa.false()),
    # How far below zero admission may take the balance (migration 0004; billing/holds.py).
    # 0 for self-service wallets and for every wallet that existed before the column.
    sa.Column("overdraft_limit_nano", sa.BigInteger, nullable=False, server_default="0"),
    sa.CheckConstraint("reserved_nano >= 0", name="wallets_reserved_not_negative"),
    sa.CheckConstraint("overdraft_limit_nano >= 0", name="wallets_overdraft_limit_not_negative"),
    sa.CheckConstraint("source IN ('signup', 'kubernetes', 'admin')", name="wallets_source_known"),
)
# One self-service wallet per email; Kubernetes-declared wallets may share an owner.
sa.Index(
    "wallets_signup_email_unique",
    sa.func.lower(wallets.c.email),
    unique=True,
    postgresql_where=wallets.c.source == "signup",
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("wallet_id", sa.Text, sa.ForeignKey("wallets.id"), nullable=False, index=True),
    sa.Column("key_hash", sa.LargeBinary(32), nullable=False, unique=True),
    sa.Column("display_prefix", sa.Text, nullable=False),
    sa.Column("allowed_models", pg.ARRAY(sa.Text), nullable=True),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("suspended", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("external_id", sa.Text, nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
    # A rotated key works until then and is refused as revoked after (migration 0002).
    sa.Column("revoke_after", sa.DateTime(timezone=True), nullable=True),
    # A per-key spend limit (migration 0009; billing/key_limits.py): NULL for a key without one.
    sa.Column("limit_nano", sa.BigInteger, nullable=True),
    sa.Column("limit_window", sa.Text, nullable=True),
    # When the window's count began: its calendar start, or later if the limit was set since.
    sa.Column("window_start", sa.DateTime(timezone=True), nullable=True),
    # Running sums kept by the Check and the settlements, as the wallet's are: posted in the
    # window, and the pending holds that count against a limit.
    sa.Column("spent_nano", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("reserved_nano", sa.BigInteger, nullable=False, server_default="0"),
    sa.CheckConstraint("limit_nano >= 0", name="api_keys_limit_not_negative"),
    sa.CheckConstraint(
        "limit_window IN ('daily', 'weekly', 'monthly', 'total')", name="api_keys_limit_window_known"
    ),
    sa.CheckConstraint("(limit_nano IS NULL) = (limit_window IS NULL)", name="api_keys_limit_has_window"),
    sa.CheckConstraint("spent_nano >= 0", name="api_keys_spent_not_negative"),
    sa.CheckConstraint("reserved_nano >= 0", name="api_keys_reserved_not_negative"),
)
sa.Index("api_keys_by_owner", api_keys.c.source, api_keys.c.external_id)

ledger_entries = sa.Table(
    "ledger_entries",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("wallet_id", sa.Text, sa.ForeignKey("wallets.id"), nullable=False),
    sa.Column("idempotency_key", sa.Text, nullable=False, unique=True),
    # grant | usage | credit | topup | refund | dispute | dispute_reversal | adjustment
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("amount_nano", sa.BigInteger, nullable=False),
    sa.Column("balance_after_nano", sa.BigInteger, nullable=False),
    sa.Column("details", pg.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
)
sa.Index("ledger_entries_wallet_newest", ledger_entries.c.wallet_id, ledger_entries.c.id.desc())

# A hold names its wallet, key and model, except a void that stands in a request id's place
# before any hold (holds.void_before_hold): it names none, holds nothing and charges nothing.
HOLDS_OWNED_OR_VOID_BEFORE_HOLD = (
    "(wallet_id IS NOT NULL AND key_id IS NOT NULL AND model IS NOT NULL)"
    " OR (wallet_id IS NULL AND key_id IS NULL AND model IS NULL"
    " AND state = 'voided' AND amount_nano = 0 AND posted_nano IS NULL)"
)

holds = sa.Table(
    "holds",
    metadata,
    # Envoy's x-request-id: the Check and the access-log entry of one request share it.
    sa.Column("request_id", sa.Text, primary_key=True),
    # NULL, all three, only in a void a refused Check's report left before any hold (migration
    # 0013; holds.void_before_hold): that report names no wallet.
    sa.Column("wallet_id", sa.Text, sa.ForeignKey("wallets.id"), nullable=True),
    sa.Column("key_id", sa.Text, sa.ForeignKey("api_keys.id"), nullable=True),
    sa.Column("model", sa.Text, nullable=True),
    sa.Column("amount_nano", sa.BigInteger, nullable=False),
    sa.Column("state", sa.Text, nullable=False, server_default="pending"),
    sa.Column("posted_nano", sa.BigInteger, nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
    # The key's window this hold counts in (migration 0009): NULL when its key had no limit.
    sa.Column("limit_window_start", sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("amount_nano >= 0", name="holds_amount_not_negative"),
    sa.CheckConstraint("state IN ('pending', 'posted', 'voided', 'expired')", name="holds_state_known"),
    sa.CheckConstraint(HOLDS_OWNED_OR_VOID_BEFORE_HOLD, name="holds_owned_or_void_before_hold"),
)
sa.Index(
    "holds_pending_by_expiry",
    holds.c.expires_at,
    postgresql_where=holds.c.state == "pending",
)
# A key's last use and spend, without a write on the Check's path (migration 0006;
# billing/key_management.py, docs/decisions/0032-self-service-keys.md).
sa.Index("holds_by_key", holds.c.key_id, holds.c.created_at)
# The sweep's final resolution of expired holds no access log reported (billing/holds.py).
sa.Index(
    "holds_expired_by_resolution",
    holds.c.resolved_at,
    postgresql_where=holds.c.state == "expired",
)

# How far the sidecar has settled each JSON access-log file Envoy wrote (migration 0005;
# authz_sidecar/access_log_file.py). A file is known by the SHA-256 of its first line (a request
# id and a start time: no two files share it), so a rotated file, a restarted sidecar or a
# replaced one each find their place.
access_log_cursors = sa.Table(
    "access_log_cursors",
    metadata,
    sa.Column("log_id", sa.Text, primary_key=True),
    sa.Column("path", sa.Text, nullable=False),
    # Bytes of the file settled: everything before this offset, always the end of a line.
    sa.Column("position", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
    sa.CheckConstraint("position >= 0", name="access_log_cursors_position_not_negative"),
)

# --- Stripe (migration 0003; the rules live in billing/payments.py) -------------------------------

stripe_events = sa.Table(
    "stripe_events",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("type", sa.Text, nullable=False),
    sa.Column("object_id", sa.Text, nullable=True),
    sa.Column("livemode", sa.Boolean, nullable=False),
    # The event's own `created` (Unix seconds): orders a dispute's status changes.
    sa.Column("stripe_created", sa.BigInteger, nullable=False),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
    sa.Column("outcome", sa.Text, nullable=False),
    # The wallet the event named, even one that does not exist (so no foreign key).
    sa.Column("wallet_id", sa.Text, nullable=True),
    sa.Column("detail", sa.Text, nullable=False, server_default=""),
)

stripe_checkout_sessions = sa.Table(
    "stripe_checkout_sessions",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("wallet_id", sa.Text, sa.ForeignKey("wallets.id"), nullable=False),
    sa.Column("amount_nano", sa.BigInteger, nullable=False),
    sa.Column("status", sa.Text, nullable=False, server_default="open"),
    sa.Column("payment_intent", sa.Text, nullable=True),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
)
sa.Index("stripe_checkout_sessions_wallet", stripe_checkout_sessions.c.wallet_id)
# The operator's reconciler looks up sessions still open, oldest first.
sa.Index(
    "stripe_checkout_sessions_open",
    stripe_checkout_sessions.c.created_at,
    postgresql_where=sa.text("status = 'open'"),
)

stripe_payments = sa.Table(
    "stripe_payments",
    metadata,
    sa.Column("payment_intent", sa.Text, primary_key=True),
    # NULL until a paid checkout session names the wallet (a refund or dispute may come first).
    sa.Column("wallet_id", sa.Text, sa.ForeignKey("wallets.id"), nullable=True),
    sa.Column("checkout_session", sa.Text, nullable=True),
    sa.Column("charge", sa.Text, nullable=True),
    sa.Column("amount_nano", sa.BigInteger, nullable=True),
    sa.Column("paid", sa.Boolean, nullable=False, server_default=sa.false()),
    # Stripe's cumulative charge.amount_refunded (the largest seen) and how much of it is debited.
    sa.Column("refunded_nano", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("refund_applied_nano", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
)
sa.Index("stripe_payments_wallet", stripe_payments.c.wallet_id)

stripe_disputes = sa.Table(
    "stripe_disputes",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("payment_intent", sa.Text, sa.ForeignKey("stripe_payments.payment_intent"), nullable=False),
    sa.Column("charge", sa.Text, nullable=True),
    sa.Column("amount_nano", sa.BigInteger, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("status_event_created", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
)
sa.Index("stripe_disputes_payment_intent", stripe_disputes.c.payment_intent)

# --- Low-balance alerts (migration 0007; the rules live in billing/alerts.py) ---------------------

# What the sweep watches of a wallet: the balance it last saw, the thresholds, and the webhook
# endpoint the owner registered, if any (url and signing_secret NULL together: a wallet watched
# only for its mail or its Kubernetes Events, migration 0011).
alert_endpoints = sa.Table(
    "alert_endpoints",
    metadata,
    sa.Column("wallet_id", sa.Text, sa.ForeignKey("wallets.id"), primary_key=True),
    sa.Column("url", sa.Text, nullable=True),
    # Kept as it is: an HMAC is computed with the secret, so a hash of it could not sign
    # (docs/decisions/0033-low-balance-alerts.md).
    sa.Column("signing_secret", sa.Text, nullable=True),
    # The owner's thresholds; NULL: the defaults (20 % of the last top-up or $1, and $0).
    sa.Column("thresholds_nano", pg.ARRAY(sa.BigInteger), nullable=True),
    # The default low threshold, recomputed by the sweep when the balance rose.
    sa.Column("low_default_nano", sa.BigInteger, nullable=False),
    # The balance the last sweep saw: a threshold above it is armed.
    sa.Column("observed_balance_nano", sa.BigInteger, nullable=False),
    # How many sweeps moved observed_balance_nano: part of an event's unique key.
    sa.Column("observation", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
    sa.CheckConstraint("length(url) <= 2048", name="alert_endpoints_url_length"),
    sa.CheckConstraint("(url IS NULL) = (signing_secret IS NULL)", name="alert_endpoints_webhook_whole"),
)

# Events to deliver (and delivered: the record of what was sent, attempted, or given up).
alert_events = sa.Table(
    "alert_events",
    metadata,
    # The receiver's idempotency key: the same on every attempt.
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("wallet_id", sa.Text, sa.ForeignKey("wallets.id"), nullable=False),
    sa.Column("type", sa.Text, nullable=False),
    sa.Column("observation", sa.BigInteger, nullable=True),
    sa.Column("threshold_nano", sa.BigInteger, nullable=True),
    sa.Column("balance_nano", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
    sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("gave_up_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("last_error", sa.Text, nullable=True),
    # What an event other than a balance crossing says (a recharge, a key's limit); sent as data.
    sa.Column("data", pg.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    sa.UniqueConstraint(
        "wallet_id", "observation", "threshold_nano", "type", name="alert_events_one_per_crossing"
    ),
)
sa.Index("alert_events_by_wallet", alert_events.c.wallet_id, alert_events.c.created_at)
# The channels' look for events made since they last looked (migration 0011).
sa.Index("alert_events_by_time", alert_events.c.created_at)
# The worker's claim: events neither delivered nor given up, by when they are due.
sa.Index(
    "alert_events_due",
    alert_events.c.next_attempt_at,
    postgresql_where=sa.text("delivered_at IS NULL AND gave_up_at IS NULL"),
)

# Each event on each channel besides the webhook (whose state is alert_events' own columns), so
# one channel failing resends nothing on another (migration 0011; billing/alerts.py).
alert_deliveries = sa.Table(
    "alert_deliveries",
    metadata,
    sa.Column("event_id", sa.Text, sa.ForeignKey("alert_events.id"), primary_key=True),
    # mail: sent to the wallet's email; kubernetes: posted as an Event on the Wallet resource.
    sa.Column("channel", sa.Text, primary_key=True),
    # Where it went: the address (mail) as it was when the event was taken.
    sa.Column("recipient", sa.Text, nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
    sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("gave_up_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.CheckConstraint("channel IN ('mail', 'kubernetes')", name="alert_deliveries_channel_known"),
)
sa.Index(
    "alert_deliveries_due",
    alert_deliveries.c.channel,
    alert_deliveries.c.next_attempt_at,
    postgresql_where=sa.text("delivered_at IS NULL AND gave_up_at IS NULL"),
)

account_sessions = sa.Table(
    "account_sessions",
    metadata,
    # SHA-256 of the cookie's token: the table holds nothing a visitor could present.
    sa.Column("token_hash", sa.LargeBinary(32), primary_key=True),
    sa.Column("wallet_id", sa.Text, sa.ForeignKey("wallets.id"), nullable=False),
    sa.Column("key_id", sa.Text, sa.ForeignKey("api_keys.id"), nullable=False),
    sa.Column("csrf_token", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
    # Idle end (moved by each use) and absolute end (fixed at sign-in).
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("ends_at", sa.DateTime(timezone=True), nullable=False),
)
sa.Index("account_sessions_expiry", account_sessions.c.expires_at)
# The account page's spend chart: a wallet's usage entries by time, one aggregate query.
sa.Index(
    "ledger_usage_by_wallet_time",
    ledger_entries.c.wallet_id,
    ledger_entries.c.created_at,
    postgresql_where=ledger_entries.c.kind == "usage",
)

# --- Auto-recharge (migration 0010; the rules live in billing/recharges.py) ----------------------

# A wallet's setting, its saved card and Stripe Customer, and the row the sweep locks before it
# starts a recharge (docs/decisions/0034-auto-recharge.md).
auto_recharges = sa.Table(
    "auto_recharges",
    metadata,
    sa.Column("wallet_id", sa.Text, sa.ForeignKey("wallets.id"), primary_key=True),
    # False after DELETE: the row (history, the month's total) stays.
    sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.Column("threshold_nano", sa.BigInteger, nullable=False),
    sa.Column("amount_nano", sa.BigInteger, nullable=False),
    # NULL: no monthly cap.
    sa.Column("monthly_cap_nano", sa.BigInteger, nullable=True),
    # The wallet's Stripe Customer, made on the first PUT (idempotency key customer:<wallet>).
    sa.Column("stripe_customer_id", sa.Text, nullable=True),
    # The card saved by the setup Checkout; NULL until one is.
    sa.Column("payment_method", sa.Text, nullable=True),
    sa.Column("card_brand", sa.Text, nullable=True),
    sa.Column("card_last4", sa.Text, nullable=True),
    sa.Column("consecutive_failures", sa.Integer, nullable=False, server_default="0"),
    # Set when consecutive_failures reached the limit; only a PUT clears it.
    sa.Column("paused_reason", sa.Text, nullable=True),
    # The last recharge's seq: the next one is last_seq + 1.
    sa.Column("last_seq", sa.Integer, nullable=False, server_default="0"),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
    sa.CheckConstraint("threshold_nano >= 0", name="auto_recharges_threshold_not_negative"),
    sa.CheckConstraint("amount_nano > 0", name="auto_recharges_amount_positive"),
    sa.CheckConstraint(
        "monthly_cap_nano IS NULL OR monthly_cap_nano >= amount_nano", name="auto_recharges_cap_fits_one"
    ),
    sa.CheckConstraint("consecutive_failures >= 0", name="auto_recharges_failures_not_negative"),
)

# One off-session charge: creating (the PaymentIntent not known yet) → pending → succeeded | failed.
recharges = sa.Table(
    "recharges",
    metadata,
    sa.Column("wallet_id", sa.Text, sa.ForeignKey("wallets.id"), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True),
    # What the PaymentIntent is created with, fixed at the start: a retry under the same
    # idempotency key must send the same parameters, whatever the setting says by then.
    sa.Column("amount_nano", sa.BigInteger, nullable=False),
    # The cap in force when it started (the audit checks the month against it).
    sa.Column("monthly_cap_nano", sa.BigInteger, nullable=True),
    sa.Column("customer", sa.Text, nullable=False),
    sa.Column("payment_method", sa.Text, nullable=False),
    sa.Column("state", sa.Text, nullable=False, server_default="creating"),
    sa.Column("payment_intent", sa.Text, nullable=True, unique=True),
    sa.Column("failure_code", sa.Text, nullable=True),
    sa.Column("failure_message", sa.Text, nullable=True),
    # Calls to Stripe so far, and when the next may be made (a lease while one runs, a back-off
    # after Stripe was unreachable).
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
    sa.CheckConstraint(
        "state IN ('creating', 'pending', 'succeeded', 'failed')", name="recharges_state_known"
    ),
    sa.CheckConstraint("amount_nano > 0", name="recharges_amount_positive"),
)
# Never two in flight for one wallet, whoever inserts.
sa.Index(
    "recharges_one_in_flight",
    recharges.c.wallet_id,
    unique=True,
    postgresql_where=sa.text("state IN ('creating', 'pending')"),
)
sa.Index("recharges_due", recharges.c.next_attempt_at, postgresql_where=sa.text("state = 'creating'"))

# Checkout Sessions in setup mode the gateway created (PUT /billing/auto-recharge).
recharge_setup_sessions = sa.Table(
    "recharge_setup_sessions",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("wallet_id", sa.Text, sa.ForeignKey("wallets.id"), nullable=False),
    sa.Column("customer", sa.Text, nullable=False),
    # The card its completion saved.
    sa.Column("payment_method", sa.Text, nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=_now),
)
sa.Index("recharge_setup_sessions_wallet", recharge_setup_sessions.c.wallet_id)
