"""The `billingproxy` command: local stack (`up`), the sidecar, the operator, admin commands."""
