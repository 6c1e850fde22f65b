"""Spool: the on-disk queue, its durable writes, group commit, locks and recovery; the only
code that knows the directory names, and it never decides what to do with a message."""
