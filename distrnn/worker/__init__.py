"""One training process: its entry (training), the loop (trainer), the non-finite guard, progress and rank timing,
profiling, tracking."""
