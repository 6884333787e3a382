"""The model's dense projections (attention, LM head, shared experts): native-kernel patch, weight-only int8."""
