"""bidsio."""
