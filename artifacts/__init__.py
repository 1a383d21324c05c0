"""What the trainer writes and the service reads: the adapter manifest, module groups, atomic outputs.

Both sides import this package; it needs only the standard library and pydantic, so the serving image does
not need the trainer's dependencies and the trainer does not need the service's.
"""
