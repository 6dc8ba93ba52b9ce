"""The data layer: files -> (array, metadata) -> preprocessing -> instruction records.

Knows nothing of models: it yields numpy arrays, metadata dicts and JSONL records.
"""
