"""Clustering: CLIP features -> spherical k-means (FAISS, up to ~1M centers) -> top-k multi-labels.

Stages (run by `cluster.py`, each resumable and skipping finished work):
    extract.run  open_clip features per shard     OUT/features/
    kmeans.run   centers from a feature sample    OUT/centers.npy, kmeans_report.json, cluster_sizes.png
    assign.run   top-k centers per image          OUT/labels/ (mlcd.data.labels format)
"""
