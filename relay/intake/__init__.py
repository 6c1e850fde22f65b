"""Intake: the SMTP listeners, sessions, the DATA reader and admission (relay policy, auth,
lanes and quotas, directives, DKIM) up to the durable 250; it never delivers."""
