"""The Envoy-facing process: ext_authz Check, the gRPC access log, the public HTTP API, admin."""
