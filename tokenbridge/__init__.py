"""tokenbridge: one hardware certificate, shared safely between many workstations."""

__version__ = "0.1.0"
