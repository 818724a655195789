"""Where configuration comes from: each source yields Kubernetes-style objects."""
