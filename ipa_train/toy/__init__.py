"""The toy world: tiny models built offline for demos and tests."""
