"""Adapter registry: which names a client may ask for, and where each adapter lives."""
