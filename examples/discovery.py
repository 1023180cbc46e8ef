#!/usr/bin/env aurae-py
"""Ask the daemon who it is."""

from aurae_sdk.script import client

response = client.discovery.discover()
print(f"auraed {response.version} healthy={response.healthy}")
