"""Turns logged exchanges and ratings into LoRA adapters (see issue: online tuner)."""
