"""The real-time card-fraud demo: a reproducible transaction generator and its feature
definitions (`features.yaml`)."""
