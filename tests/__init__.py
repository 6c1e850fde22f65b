"""Test suite for relay: real sockets on loopback, a real DNS server, the real daemon."""
