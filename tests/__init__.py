"""Tests: unit tests, and tests on the real engine through real HTTP."""
