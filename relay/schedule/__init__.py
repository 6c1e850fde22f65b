"""Schedule: the index by next attempt, dispatch under the limits, one attempt, applying its
outcome (retry, bounce, dead letter), backoff and shaping; it never speaks SMTP itself."""
