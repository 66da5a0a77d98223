"""Observability: metrics and health endpoints, structured logs, audit trail and export."""
