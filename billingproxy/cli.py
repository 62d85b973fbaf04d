"""Placeholder; the real command line lands with the sidecar."""
import sys


def main(argv: list[str] | None = None) -> int:
    print("billingproxy: not yet", file=sys.stderr)
    return 2
