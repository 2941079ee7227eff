"""Pictures to check results."""
