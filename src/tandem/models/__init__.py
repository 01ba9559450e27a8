"""Model code per architecture family (plain torch modules, no I/O)."""
