"""`hf-kd cache-teacher`: run the recipe's teacher over its data once and store its top-k log-probabilities."""

from __future__ import annotations

import logging

from hf_kd.cli.train import recipe_key
from hf_kd.recipe.recipe import Recipe, RecipeError

logger = logging.getLogger("hf_kd")


def run_cache_teacher(recipe: Recipe, args) -> int:
    """Cache the teacher's top-k log-probs over the recipe's tokenized train and eval data (hf_kd.teachers.cache.build)."""
    from hf_kd.teachers.cache.build import build_from_recipe

    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logger.setLevel(logging.INFO)
    output = args.output or recipe.teacher.cache
    if not output:
        raise RecipeError(recipe.path, "--output", "where should the cache go? pass --output DIR or set teacher.cache")
    from hf_kd.errors import SetupError

    try:
        cache = build_from_recipe(recipe, output, k=args.k, batch_size=args.batch_size, shard_size=args.shard_size)
    except SetupError as err:  # a pair a cache cannot serve
        raise RecipeError(recipe.path, recipe_key(err.field), err.problem) from None
    except ValueError as err:  # another build's settings in --output, k > vocab size
        raise RecipeError(recipe.path, "--output", str(err)) from None
    meta = cache.metadata
    print(
        f"{cache.path}: {meta['num_examples']} examples, {meta['num_positions']} positions, "
        f"{meta['bytes_per_position']} bytes per position (k={cache.k}); train with --teacher_cache {cache.path}"
    )
    return 0
