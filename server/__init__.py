"""Gemma 4 adapter server: many LoRA adapters of one Gemma 4 model behind an OpenAI API."""
