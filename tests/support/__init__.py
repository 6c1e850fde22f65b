"""Test doubles that are real servers: a DNS server and scriptable SMTP MX hosts on loopback."""
