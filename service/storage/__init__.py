"""Durable state: the ledger's tables and queries, its batch writer, the spool of received files."""
