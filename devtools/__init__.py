"""Developer commands that keep generated parts of the repository equal to their sources."""
