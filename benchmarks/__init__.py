"""Benchmarks that compare setpoint with the tools it replaces, run on the machine at hand (`python -m
benchmarks.<name>`). Not part of the installed package."""
