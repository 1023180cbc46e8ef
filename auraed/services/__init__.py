"""The gRPC services: one module per proto service, each subclassing its
generated base in auraed.generated and translating between API messages and
the runtime. Errors they raise become statuses in auraed.interceptors."""
