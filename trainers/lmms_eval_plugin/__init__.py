"""GAP in lmms-eval, the field's evaluation harness: the model `gap` and local tasks.

- `model`: `GapLmmsConfig` (the `--model_args`) and `GapLmms`, an lmms-eval chat model (`is_simple = False`) that
  loads a GAP checkpoint (or converts a stock / Monet / Mirage / LVR one) and answers with GAP's latent-aware
  `generate`, latent options included (`latent_intervention=zero` runs the probe on a benchmark).
- `tasks`: writes an `--include_path` folder of task YAMLs over local data: `gap_shapes` (rows in GAP's schema, scored
  as `gap eval` scores them) and local copies of `vstar_bench`, `hrbench4k`, `mmerealworld`, `mathvista_testmini`
  that include lmms-eval's own YAMLs with `dataset_path` pointed at a `save_to_disk` folder.
- `runner`: `gap lmms-eval ...` runs lmms-eval's CLI and fails when its results file is missing or holds an error
  (lmms-eval itself exits 0 when an evaluation fails).

lmms-eval finds the model through the `lmms_eval.models` entry point of this package (`gap_model_manifest`). This
module imports nothing heavy: lmms-eval loads every entry point each time it starts.
"""

MODEL_ID = "gap"
MODEL_CLASS_PATH = "trainers.lmms_eval_plugin.model.GapLmms"


def gap_model_manifest():
    """The `lmms_eval.models` entry point: the model id `gap`, a chat model (`GapLmms`)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, chat_class_path=MODEL_CLASS_PATH)


__all__ = ["MODEL_CLASS_PATH", "MODEL_ID", "gap_model_manifest"]
