"""Routing: which studies go to which model, which series it reads, and what is never processed."""
