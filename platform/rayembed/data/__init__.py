"""Training data: the unified schema, public-dataset loaders, mining, mixing and streaming."""
