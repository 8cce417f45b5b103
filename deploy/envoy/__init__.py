"""Envoy in front of several replicas: `envoy.yaml` and its renderer."""
