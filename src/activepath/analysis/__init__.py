"""Measurements over a model's routing and its language-model quality."""
