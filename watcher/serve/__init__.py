"""``pairwatch serve``: the app factory, its routes, admission, uploads, webhook events,
readiness, the legacy ``/compare`` envelope and the errors it answers."""
