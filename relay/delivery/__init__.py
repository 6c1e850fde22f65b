"""Delivery: routes and MX resolution, TLS policy and MTA-STS, connections and the pool, the
outbound SMTP transaction; it offers one message to one destination and never reschedules."""
