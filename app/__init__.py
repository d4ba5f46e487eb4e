"""lakesaga: crash-safe lakehouse ingestion as durable sagas (Bronze -> Silver -> Gold)."""

__version__ = "0.1.0"
