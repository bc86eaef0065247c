"""Recipes: a YAML file -> validated dataclasses -> a DistillationConfig."""

from hf_kd.recipe.recipe import (  # noqa: F401
    DATA_EXTENSIONS,
    DATA_FORMATS,
    DataSection,
    ModelSection,
    Recipe,
    RecipeError,
    load_recipe,
)
