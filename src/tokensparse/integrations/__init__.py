"""Integrations with other libraries (diffusers). Import the submodules directly; nothing is imported here."""
