"""Helpers every test folder shares (importable as ``support``: pyproject puts ``tests`` on the path).

Why a package and not conftest: conftest modules provide fixtures and are not meant to be
imported; a helper that several folders need lives here once.
"""
