"""Loading datasets for any stage: a `save_to_disk` directory (a `Dataset` or a `DatasetDict`), a Hub dataset id,
or `synthetic` (the offline task of `trainers.synthetic`)."""

import os

SYNTHETIC_DATASET = "synthetic"
# `synthetic` as a named split (evaluation, PCA fit, capacity): (rows, seed) of each split.
SYNTHETIC_SPLITS = {"train": (256, 0), "test": (64, 1)}


def load_split(dataset_name: str, split: str = "test", config: str | None = None):
    """One split: from a `save_to_disk` directory (a `Dataset` is its own only split), from the Hub, or drawn from
    the synthetic task (`SYNTHETIC_SPLITS`)."""
    import datasets

    if not dataset_name:
        raise ValueError("a dataset is required: a `save_to_disk` directory, a Hub dataset id or 'synthetic'.")
    if dataset_name == SYNTHETIC_DATASET:
        from .synthetic import make_synthetic_dataset

        if split not in SYNTHETIC_SPLITS:
            raise KeyError(f"the synthetic dataset has splits {list(SYNTHETIC_SPLITS)}; no {split!r}.")
        rows, seed = SYNTHETIC_SPLITS[split]
        return make_synthetic_dataset(rows, seed=seed)
    if os.path.isdir(dataset_name):
        loaded = datasets.load_from_disk(dataset_name)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise KeyError(f"{dataset_name} has splits {list(loaded)}; no {split!r}.")
            return loaded[split]
        return loaded
    return datasets.load_dataset(dataset_name, config, split=split)


def load_training_datasets(script_args, seed: int, wants_eval: bool):
    """`(train, eval or None)` in GAP's schema for `gap sft` (`script_args`: a `GapScriptArguments`)."""
    import datasets

    from .synthetic import make_synthetic_dataset

    name = script_args.dataset_name
    if not name:
        raise ValueError("--dataset_name is required ('synthetic', a save_to_disk directory or a Hub dataset id).")
    if name == SYNTHETIC_DATASET:
        options = dict(
            image_size=script_args.synthetic_image_size, grid=script_args.synthetic_grid,
            num_colors=script_args.synthetic_num_colors, use_latent_fraction=script_args.synthetic_use_latent_fraction,
        )
        train = make_synthetic_dataset(script_args.synthetic_rows, seed=seed, **options)
        evaluation = None
        if wants_eval and script_args.synthetic_eval_rows:
            evaluation = make_synthetic_dataset(script_args.synthetic_eval_rows, seed=seed + 1, **options)
        return train, evaluation
    loaded = datasets.load_from_disk(name) if os.path.isdir(name) else datasets.load_dataset(
        name, script_args.dataset_config)
    if isinstance(loaded, datasets.Dataset):
        return loaded, None
    train = loaded[script_args.dataset_train_split]
    evaluation = None
    if wants_eval and script_args.dataset_test_split in loaded:
        evaluation = loaded[script_args.dataset_test_split]
    return train, evaluation


def make_data(args) -> str:
    """`gap make-data` (`args`: a `trainers.arguments.MakeDataArguments`): the synthetic task's train and test splits
    as a `DatasetDict` saved to `args.output_dir`."""
    import datasets

    from .synthetic import make_synthetic_dataset

    for name in ("train_rows", "test_rows"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1; got {getattr(args, name)}.")
    splits = datasets.DatasetDict(
        train=make_synthetic_dataset(args.train_rows, seed=args.seed),
        test=make_synthetic_dataset(args.test_rows, seed=args.seed + 1),
    )
    splits.save_to_disk(args.output_dir)
    print(f"wrote the synthetic task ({args.train_rows} train, {args.test_rows} test rows) to {args.output_dir}")
    return args.output_dir


__all__ = ["SYNTHETIC_DATASET", "SYNTHETIC_SPLITS", "load_split", "load_training_datasets", "make_data"]
