"""Question sets, concept sets, MATH problems, their loaders and answer grading (external data sets are read by
path, never copied here)."""
