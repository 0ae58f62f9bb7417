"""Recipes: whole jobs built from the library's layers (the demo LM's training: ``recipes.demo_lm``)."""
