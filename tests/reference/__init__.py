"""Independent, plain re-implementations used as test oracles (never imported by the product)."""
