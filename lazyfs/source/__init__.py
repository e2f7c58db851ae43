"""Where a mount reads an image from: one store (reader.StoreReader) or a fleet of cache servers
(fleet.Fleet), both BlockSources (base.py) that hand out only verified bytes; spec.Source is the
description of one, as options and as the daemon's arguments."""
