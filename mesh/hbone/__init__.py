"""HBONE: TCP tunnels as HTTP/2 CONNECT streams over mutual TLS, shared by ztunnel and waypoints."""
