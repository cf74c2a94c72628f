"""Durable storage of the router state: the Journal protocol and the SQLite journal."""
