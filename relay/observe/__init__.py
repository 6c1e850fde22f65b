"""Observation: the Prometheus metrics, the JSON log vocabulary and the HTTP endpoint serving
them; it reports what the stages do and never changes it."""
