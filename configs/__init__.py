"""Experiment configs (ml_collections): `default.py` is the schema, one file per dataset."""
