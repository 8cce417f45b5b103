"""Placeholder until written."""


def apply() -> bool:
    return False
