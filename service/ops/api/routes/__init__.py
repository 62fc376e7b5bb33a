"""API routers, one module per area: health, studies, queues, metrics, dashboard."""
