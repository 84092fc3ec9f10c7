"""The BentoML service."""
