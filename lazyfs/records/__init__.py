"""Typed records in a store, above the raw objects: verified manifest reads and references
(objects), startup profiles, provenance, the EROFS metadata record, image statistics."""
