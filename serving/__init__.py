"""Serving stage: batch segmentation of folders, retrieval queries, HTTP service."""
