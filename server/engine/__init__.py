"""The engine layer: the protocol the services use and its vLLM implementation."""
