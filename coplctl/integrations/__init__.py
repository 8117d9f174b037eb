"""Adapters that plug a coplctl reward into other libraries' trainers (``coplctl.integrations.trl``)."""
