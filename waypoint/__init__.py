"""The L7 waypoint proxy: HBONE in, HTTP/1.1 and HTTP/2 routing, retries, timeouts,
splitting, circuit breaking, rate limits, fault injection and L7 authorization; HBONE out
to the endpoint pods. Speaks HBONE through `mesh.hbone`, never through `ztunnel/`.
See docs/waypoint.md."""
