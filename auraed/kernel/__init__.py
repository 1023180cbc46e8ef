"""Kernel-facing building blocks of auraed: processes, namespaces, cgroups; no gRPC here."""
