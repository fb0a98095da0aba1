"""Fault injection for the tests (DISTRNN_FAULT): kept in one clearly named place, off unless the variable is set."""
