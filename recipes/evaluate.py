"""Evaluate a GAP (or stock Qwen2.5-VL) checkpoint by generation over a `datasets` split.

    python recipes/evaluate.py --model_name_or_path ORG/gap-7b --dataset_name AI4Math/MathVista \\
        --dataset_split testmini --column_mapping mathvista --output_dir outputs/eval-mathvista

    python recipes/evaluate.py --config recipes/tiny/gap/config_eval.yaml   # YAML, overridable on the command line

Writes `predictions.jsonl` (one record per row: generated text, extracted and gold answer, correct, latent spans)
and `results.json` (accuracy with a 95 % Wilson interval, from the `evaluate` module `recipes/metrics/gap_accuracy`)
to `output_dir`. Column mappings (`--column_mapping`) for MathVista, V*, HR-Bench and MME-RealWorld style datasets
are documented in `trainers/evaluation.py` (`COLUMN_MAPPINGS`); `gap` is our schema: `images`, `question`, `answer`,
optional `choices`.
"""

import json
import os
import sys
from dataclasses import asdict

# This file is named like the `evaluate` library: keep its folder off the import path, the repository on it.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

from trainers.evaluation import (  # noqa: E402
    EvalArguments,
    evaluate_rows,
    load_model_and_processor,
    load_eval_rows,
)


def main(args: EvalArguments) -> dict:
    model, processor = load_model_and_processor(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    rows = load_eval_rows(args)
    results, records = evaluate_rows(
        model, processor, rows, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        latent_feedback=args.latent_feedback, latent_intervention=args.latent_intervention,
        latent_intervention_seed=args.latent_intervention_seed, cache_implementation=args.cache_implementation,
    )
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "predictions.jsonl"), "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    summary = dict(results, arguments=asdict(args))
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"accuracy {results['accuracy']:.3f} (95% CI {results['ci_low']:.3f}-{results['ci_high']:.3f}, "
          f"{results['correct']}/{results['total']}); written to {args.output_dir}")
    return summary


if __name__ == "__main__":
    from trl import TrlParser

    (eval_args,) = TrlParser((EvalArguments,)).parse_args_and_config()
    main(eval_args)
