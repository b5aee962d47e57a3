"""Built-in catalog enrichers: trigger words, training facts, sidecars."""
