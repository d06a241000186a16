"""Models: the one embedder format shared by training, indexing, serving and evaluation."""
