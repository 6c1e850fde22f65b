"""Schedule: the index by next attempt, dispatch under the limits, one attempt through the
delivery agent it is given, applying its outcome (retry, bounce, dead letter), backoff and
shaping, and the operator's actions on the queue; it never speaks SMTP itself."""
