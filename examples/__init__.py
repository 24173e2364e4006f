"""Examples that run against this repository: see examples/webapp."""
