"""Converter tests (a package, so that module names such as test_base stay unique across tests/)."""
