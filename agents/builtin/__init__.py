"""Built-in, deterministic agents."""
