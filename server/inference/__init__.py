"""OpenAI-compatible inference: chat completions and completions, routed to an adapter."""
