"""Question sets, concept sets and their loaders (external data sets are read by path, never copied here)."""
