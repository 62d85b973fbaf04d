"""The core of BillingProxy: money, ledger, pricing, keys, settings and the database schema.

This package imports no web, gRPC or Kubernetes framework (an import-linter contract checks it),
so the sidecar, the operator and the admin CLI all share one implementation of the money rules.
"""
