"""History: every message's current status, its recipients' and its events, kept in SQLite for
events.retention and fed from the event journal alone; it never changes the queue."""
