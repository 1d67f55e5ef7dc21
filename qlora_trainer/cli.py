"""The command line: parse, dispatch, and turn known errors into one-line messages with DESIGN.md's exit codes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qlora_trainer.errors import EXIT_BAD_INPUT, EXIT_OK, UserError

COMMANDS = ("train", "recipes")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlora-trainer",
        description="Fine-tune a language model with QLoRA on one GPU. Without a command, trains.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a recipe (the default command)")
    _add_recipe_args(train)
    train.add_argument("--output-dir", type=Path, help="run directory (default runs/<recipe>-<time>)")
    train.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its newest checkpoint")
    train.add_argument("--dry-run", action="store_true", help="validate and print the plan; load no weights")
    train.add_argument("--force", action="store_true", help="run even where the run is predicted not to fit")

    sub.add_parser("recipes", help="list the shipped recipes")
    return parser


def _add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", required=True, help="shipped recipe name or path to a YAML recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, e.g. --set train.max_steps=50 (repeatable)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS + ("-h", "--help"):
        argv.insert(0, "train")
    args = build_parser().parse_args(argv)
    try:
        return {"train": _train, "recipes": _recipes}[args.command](args)
    except UserError as err:
        print(f"qlora-trainer: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("qlora-trainer: interrupted", file=sys.stderr)
        return 130


def _train(args) -> int:
    from qlora_trainer.recipe import load_recipe
    from qlora_trainer.run_dir import default_run_dir
    from qlora_trainer.train import RunOptions, train

    recipe, path = load_recipe(args.recipe, args.overrides)
    name = path.stem
    if args.resume and args.output_dir is None:
        raise UserError("--resume needs --output-dir: the run directory to continue")
    options = RunOptions(recipe_name=name, output_dir=args.output_dir or default_run_dir(name),
                         resume=args.resume, dry_run=args.dry_run, force=args.force)
    train(recipe, options)
    return EXIT_OK


def _recipes(args) -> int:
    from qlora_trainer.recipe import load_recipe, shipped_recipe_names, shipped_recipes_dir

    rows = []
    for name in shipped_recipe_names():
        recipe, _ = load_recipe(name)
        rows.append((name, recipe.model.name_or_path, recipe.description))
    width = max(len(r[0]) for r in rows)
    model_width = max(len(r[1]) for r in rows)
    print(f"Recipes in {shipped_recipes_dir()} (run one with: python -m qlora_trainer --recipe NAME)")
    for name, model, description in rows:
        print(f"  {name:<{width}}  {model:<{model_width}}  {description}")
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
