"""Using a trained run: the Python API (``coplctl.load``), adapting a run to new users, the HTTP server,
peft export with its model card, and integrations (TRL)."""
