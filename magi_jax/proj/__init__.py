"""Projects built on the library; each is self-contained and nothing in the library imports it."""
