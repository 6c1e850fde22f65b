"""Suppression lists: the addresses and patterns each tenant's mail is not sent to, their
store, the journal's automatic entries, and the check the intake and the scheduler make
(docs/suppression.md)."""
