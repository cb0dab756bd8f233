"""Drawn test cases that print on one line."""
from __future__ import annotations


class Case(dict):
    """A hypothesis-drawn case: a dict whose repr is one line, so that a failure's falsifying example
    (a list of many cases) stays short enough to leave the error itself in view."""

    def __repr__(self):
        return "Case(" + ", ".join(f"{k}={v!r}" for k, v in self.items()) + ")"
