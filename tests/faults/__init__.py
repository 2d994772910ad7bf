"""Fault tests: the system under crashes, outages and overload, on private local clusters."""
