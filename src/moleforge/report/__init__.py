"""Reports on a plan: explain, FLOPs, structural flexibility and parameter counts."""
