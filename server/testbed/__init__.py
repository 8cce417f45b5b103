"""The test bed: the seeded tiny Gemma 4 and its demo adapters, for `make run` and the tests."""
