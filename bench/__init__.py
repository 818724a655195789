"""`make bench`: the same pod-to-pod path direct, through ambimesh, and through an Envoy
HBONE pair, measured back to back in the lab (see docs/performance.md)."""
