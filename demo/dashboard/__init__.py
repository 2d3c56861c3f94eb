"""The demo's one app: a page showing this process's pool, a JSON twin, /healthz, load."""
