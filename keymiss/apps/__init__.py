"""Apps built on the engine: transformers pipelines as keyspaces, the demo, the example keyspaces."""
