#!/usr/bin/env aurae-py
"""Ask the daemon who it is."""

response = client.discovery.discover()
print(f"auraed {response.version} healthy={response.healthy}")
