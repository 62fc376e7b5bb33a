"""Receiving instances: the DIMSE listener and the group committer (torch-free hot path)."""
