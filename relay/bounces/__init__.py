"""Bounces: the delivery status notifications (RFC 3464) the relay sends to senders: who gets
one and when (policy), what it says (compose), what of the original goes back (returned)."""
