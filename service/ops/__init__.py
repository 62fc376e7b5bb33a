"""Operating the service: REST API and dashboard, read models, operator actions, readiness, metrics, CLI."""
