"""IR helpers: metadata schema, queries, union-find, channel labels."""
