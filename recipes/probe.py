"""Intervention probing: does the model use its latents? Accuracy under each intervention on the fed latents.

    python recipes/probe.py --model_name_or_path ORG/gap-7b --dataset_name DIR --output_dir outputs/probe

For each of none / zero / noise / shuffle / mean / drop (see `GapGenerationMixin`: zeros; Gaussian noise at each
latent's norm; a fixed permutation of the coordinates; the mean visual embedding; no span at all) it generates over
the split and reports accuracy and the change against none, as markdown (`probe.md`) and JSON (`probe.json`). If
perturbing the latents costs accuracy, they carry task-relevant signal beyond extra token slots.
"""

import json
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

from trainers.evaluation import EvalArguments, evaluate_rows, load_eval_rows, load_model_and_processor  # noqa: E402

INTERVENTIONS = [None, "zero", "noise", "shuffle", "mean", "drop"]


def probe(model, processor, rows, args: EvalArguments, progress: bool = True) -> list[dict]:
    """One evaluation per intervention; each entry: intervention, accuracy, interval, change vs none, spans."""
    table = []
    for intervention in INTERVENTIONS:
        results, _ = evaluate_rows(
            model, processor, rows, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
            latent_feedback=args.latent_feedback, latent_intervention=intervention,
            latent_intervention_seed=args.latent_intervention_seed, cache_implementation=args.cache_implementation,
            progress=progress,
        )
        table.append(dict(intervention=intervention or "none", **results))
    for entry in table:
        entry["delta_vs_none"] = entry["accuracy"] - table[0]["accuracy"]
    return table


def to_markdown(table: list[dict]) -> str:
    lines = ["| intervention | accuracy | 95% CI | change vs none | latent spans / row |", "|---|---|---|---|---|"]
    for e in table:
        lines.append(f"| {e['intervention']} | {e['accuracy']:.3f} | {e['ci_low']:.3f}-{e['ci_high']:.3f} | "
                     f"{e['delta_vs_none']:+.3f} | {e['mean_latent_spans']:.2f} |")
    return "\n".join(lines) + "\n"


def main(args: EvalArguments) -> list[dict]:
    model, processor = load_model_and_processor(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    if getattr(model.config, "latent_start_token_id", None) is None:
        raise SystemExit(f"{args.model_name_or_path} is not a GAP model: it has no latents to probe.")
    table = probe(model, processor, load_eval_rows(args), args)
    os.makedirs(args.output_dir, exist_ok=True)
    markdown = to_markdown(table)
    with open(os.path.join(args.output_dir, "probe.md"), "w") as f:
        f.write(markdown)
    with open(os.path.join(args.output_dir, "probe.json"), "w") as f:
        json.dump(table, f, indent=1)
    print(markdown)
    return table


if __name__ == "__main__":
    from trl import TrlParser

    (probe_args,) = TrlParser((EvalArguments,)).parse_args_and_config()
    main(probe_args)
