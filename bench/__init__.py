"""Load and overhead benchmarks of BillingProxy, run by `make bench` (`python -m bench`).

See docs/benchmarks.md for what each number means and the figures measured so far.
"""
