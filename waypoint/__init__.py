"""L7 waypoint proxies (HTTP routing, retries, timeouts, splitting, L7 authorization).

Placeholder: the waypoint gets its own issue. It will speak HBONE through `mesh.hbone`,
never through `ztunnel/`.
"""
