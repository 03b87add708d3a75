"""Datasets, downloads and data modules."""
