"""The mounted image: metadata index → reader → FUSE adapter → daemon."""
