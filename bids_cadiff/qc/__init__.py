"""Quality control: per-structure measurements and the flags that say when not to trust a result."""
