"""mlcd: an open training system for MLCD (Multi-label Cluster Discrimination, An et al., ECCV 2024)."""
__version__ = "0.1.0"
