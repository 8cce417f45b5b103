"""Everything about LoRA adapters (reading, validating, storing, tracking); no HTTP here."""
