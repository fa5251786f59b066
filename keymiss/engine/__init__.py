"""The library: keymiss's read-through cache, its compute path and its write-back."""
