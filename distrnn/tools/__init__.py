"""The result tools: what a user runs on a finished run folder (`distrnn predict`, `export`, `report`) and
the pictures a run leaves (figures). One process each, no rank logic: they read what training wrote."""
