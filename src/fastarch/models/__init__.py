"""Model helpers shared by the techniques: offline loaders and architecture adapters."""
