"""Deployment helpers: the Envoy front of several replicas, and running them on one machine."""
