"""An interactive latent inspector for one GAP checkpoint: a Gradio app (the Hub's default Space SDK), the `gap space`
stage that runs it, and the files `gap push --space` publishes as a Space.

    gap space --model_name_or_path outputs/gap-qwen2.5-vl-tiny-pca      # http://127.0.0.1:7860, offline
    gap push --variant hub_configs/<variant>.yaml --checkpoint DIR --repo-id ORG/NAME --space ORG/NAME-inspector

For one image and question the page shows the answer with each latent span marked in the text; for each latent of
each span its latent-lens heatmap over the image (drawn by `diagnostics.draw_lens`, as `gap latent-lens` draws it:
cosine similarity to the image's visual tokens, one colour bar from -1 to 1); the norm of each fed latent against
the mean norm of the image's visual embeddings (what fills its `<|image_pad|>` slots); and, on demand, the answer
under each latent intervention (`zero`, `noise`, `shuffle`, `drop`) beside the unchanged one.

`LatentInspector` (torch only) computes all of it with the library's own pieces (`evaluation.build_prompt`, GAP
`generate`, `diagnostics.first_image_tokens` / `lens_maps`), so the page shows exactly what the library computes.
`build_app` lays it out with gradio, imported there and only there: gradio is the optional extra `.[space]`, and no
other module of the package imports it.
"""

import io
import json
import logging
import os
import threading
from dataclasses import dataclass

import torch

from .arguments import SpaceArguments
from .diagnostics import draw_lens, first_image_tokens, lens_maps
from .evaluation import EvalRow, build_prompt

logger = logging.getLogger(__name__)

# The gradio release the `[space]` extra pins and a published Space's card names as its `sdk_version`.
GRADIO_VERSION = "6.31.0"
# The interventions the page offers (`mean` is left to `gap probe`: it measures the input shift, not the content).
SPACE_INTERVENTIONS = ("zero", "noise", "shuffle", "drop")
EXAMPLES_FILE = "examples.json"  # in an examples folder: [[image file, question], ...]


class UploadError(ValueError):
    """An input the app cannot use (not an image, too large, an empty question); the message says what to do."""


# ---- settings --------------------------------------------------------------------------------------------------------
@dataclass
class InspectorConfig:
    """The generation settings of one request (the page's controls), passed to GAP `generate` as they are."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    seed: int = 0  # seeds sampling (torch.manual_seed before generate) and the noise / shuffle interventions
    max_latent_spans: int | None = None  # None: no limit

    def __post_init__(self):
        if not (isinstance(self.max_new_tokens, int) and 1 <= self.max_new_tokens <= 4096):
            raise UploadError(f"max new tokens must be a whole number from 1 to 4096; got {self.max_new_tokens!r}.")
        if self.do_sample and not self.temperature > 0:
            raise UploadError(f"temperature must be > 0 when sampling; got {self.temperature!r}.")
        if self.max_latent_spans is not None and not (isinstance(self.max_latent_spans, int)
                                                      and self.max_latent_spans >= 0):
            raise UploadError(f"max latent spans must be a whole number >= 0, or empty for no limit; got "
                              f"{self.max_latent_spans!r}.")

    def generate_kwargs(self) -> dict:
        kwargs = dict(max_new_tokens=self.max_new_tokens, do_sample=self.do_sample,
                      max_latent_spans=self.max_latent_spans, latent_intervention_seed=self.seed)
        if self.do_sample:
            kwargs["temperature"] = self.temperature
        return kwargs


# ---- uploads ---------------------------------------------------------------------------------------------------------
def open_upload(path: str, max_pixels: int, name: str | None = None):
    """The uploaded file as an RGB image; `UploadError` (one line: what is wrong, what to do) if it is not an image
    PIL can decode or has more than `max_pixels` pixels (checked from its header, before decoding)."""
    from PIL import Image, ImageFile, UnidentifiedImageError

    name = name or os.path.basename(path)
    # Some libraries (lmms-eval among them) set PIL's global LOAD_TRUNCATED_IMAGES at import, which would decode a
    # truncated upload into grey pixels: decode strictly here whatever was imported beside the app.
    load_truncated, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise UploadError(f"'{name}' is {width}x{height} pixels ({width * height / 1e6:.0f} Mpx); this app "
                                  f"takes at most {max_pixels / 1e6:g} Mpx: downscale it and upload it again.")
            if max(width, height) > 200 * min(width, height):
                raise UploadError(f"'{name}' is {width}x{height} pixels; the model takes images whose sides differ "
                                  "by at most 200x: crop it and upload it again.")
            image.load()
            return image.convert("RGB")
    except UnidentifiedImageError:
        raise UploadError(f"'{name}' is not an image this app can read: upload a PNG, JPEG, WebP or GIF file.") from None
    except Image.DecompressionBombError:
        raise UploadError(f"'{name}' is far too large to decode: downscale it below {max_pixels / 1e6:g} Mpx and "
                          "upload it again.") from None
    except (OSError, SyntaxError) as error:
        raise UploadError(f"'{name}' could not be decoded ({error}): it is truncated or corrupt; upload another "
                          "file.") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = load_truncated


# ---- the inspector ---------------------------------------------------------------------------------------------------
@dataclass
class Inspection:
    """What the page shows for one image and question."""

    answer: str  # the generated text, special tokens dropped (as `gap eval` reads it)
    segments: list[tuple[str, str | None]]  # text runs (label None) and latent spans (label "latent span i")
    # Spans and latents are numbered from 0, as `gap latent-lens` numbers its panels.
    maps: torch.Tensor  # (spans, K, gh, gw) latent-lens cosine similarities
    latent_norms: torch.Tensor  # (spans, K) norm of each fed latent
    visual_embedding_norm: float  # mean norm of the image's visual embeddings
    generated_ids: list[int]  # generated tokens (latent slots as <|latent_pad|>)

    @property
    def num_spans(self) -> int:
        return int(self.maps.shape[0])


class LatentInspector:
    """One GAP model and its processor, answering one image and question at a time (a lock serialises callers)."""

    def __init__(self, model, processor, name: str = "model"):
        """`name`: how the page names the model (a Hub id, or a checkpoint folder's name)."""
        if getattr(model.config, "latent_start_token_id", None) is None:
            raise ValueError(f"{name} is not a GAP model (its config has no latent tokens): the inspector shows "
                             "latent spans; convert a stock checkpoint with `gap fit-pca` first.")
        self.model, self.processor, self.name = model.eval(), processor, name
        self.processor.tokenizer.padding_side = "left"
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, name_or_path: str, revision: str | None = None, trust_remote_code: bool = False,
                        allow_pickle_weights: bool = False) -> "LatentInspector":
        from .model_loader import load_model

        model, processor = load_model(name_or_path, stock="keep", revision=revision,
                                      trust_remote_code=trust_remote_code, allow_pickle_weights=allow_pickle_weights)
        name = str(name_or_path)
        return cls(model, processor, name=os.path.basename(os.path.normpath(name)) if os.path.isdir(name) else name)

    @property
    def num_latent_tokens(self) -> int:
        return int(self.model.config.max_latents_per_span)

    def inputs(self, image, question: str):
        """The processor batch of one row: the image and the question in the chat template, as `gap eval` builds
        it (`evaluation.build_prompt`)."""
        question = (question or "").strip()
        if not question:
            raise UploadError("Type a question about the image.")
        row = EvalRow(images=[image], question=question, answer="", choices=None, kind="text")
        try:
            inputs = self.processor(images=[image], text=[build_prompt(self.processor, row)], return_tensors="pt")
        except ValueError as error:  # e.g. an image the image processor cannot resize
            raise UploadError(f"The image processor refused this image: {error}") from None
        return inputs.to(next(self.model.parameters()).device)

    @torch.no_grad()
    def generate(self, inputs, config: InspectorConfig, latent_intervention: str | None = None):
        """GAP `generate` with the page's settings (seeded), returning the fed latents too."""
        if config.do_sample:
            torch.manual_seed(config.seed)
        return self.model.generate(**inputs, **config.generate_kwargs(), latent_intervention=latent_intervention,
                                   return_latents=True)

    def decode(self, generated_ids) -> str:
        return self.processor.decode(generated_ids, skip_special_tokens=True)

    def segments(self, generated_ids: list[int]) -> list[tuple[str, str | None]]:
        """The generated text split into text runs (label None) and latent spans, each shown as
        "[K latents]" with the label "latent span i" (from 0, as `gap latent-lens` numbers them)."""
        _, start_id, end_id = self.model.config.latent_token_ids
        segments, run, span, slots = [], [], 0, 0

        def flush():
            if text := self.decode(run):
                segments.append((text, None))
            run.clear()

        inside = False
        for token in generated_ids:
            if token == start_id:
                flush()
                inside, slots = True, 0
            elif inside and token == end_id:
                segments.append((f"[{slots} latents]", f"latent span {span}"))
                span += 1
                inside = False
            elif inside:
                slots += 1
            else:
                run.append(token)
        flush()
        if inside:  # cut by max new tokens inside a span
            segments.append((f"[{slots} latents, unfinished]", f"latent span {span}"))
        return segments

    def inspect(self, image, question: str, config: InspectorConfig) -> Inspection:
        inputs = self.inputs(image, question)
        with self._lock:
            out = self.generate(inputs, config)
            visual, grid = first_image_tokens(self.model, inputs)
        generated = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
        latents = out.latents[0].float()  # (spans, K, hidden)
        return Inspection(
            answer=self.decode(generated),
            segments=self.segments(generated),
            maps=lens_maps(out.latents[0], visual, grid),
            latent_norms=latents.norm(dim=-1).cpu(),
            visual_embedding_norm=visual.float().norm(dim=-1).mean().item(),
            generated_ids=generated,
        )

    def answers_under(self, image, question: str, config: InspectorConfig, interventions,
                      on_answer=None) -> dict[str, str]:
        """The answer unchanged ("none") and under each intervention, with the same settings and seed;
        `on_answer(done, total, name)` is called before each generation (the page's progress bar)."""
        unknown = [name for name in interventions if name not in SPACE_INTERVENTIONS]
        if unknown:
            raise UploadError(f"unknown intervention {unknown[0]!r}; choose from {', '.join(SPACE_INTERVENTIONS)}.")
        inputs = self.inputs(image, question)
        answers = {}
        names = (None, *interventions)
        for done, name in enumerate(names):
            if on_answer is not None:
                on_answer(done, len(names), name or "none")
            with self._lock:
                out = self.generate(inputs, config, latent_intervention=name)
            answers[name or "none"] = self.decode(out.sequences[0, inputs["input_ids"].shape[1]:])
        return answers


# ---- what the page draws ---------------------------------------------------------------------------------------------
def lens_figures(image, maps: torch.Tensor) -> list[tuple[object, str]]:
    """One latent-lens figure per latent, (PIL image, caption), drawn by `draw_lens` (the `gap latent-lens`
    drawing) with its colour bar."""
    from PIL import Image

    figures = []
    for s in range(maps.shape[0]):
        for j in range(maps.shape[1]):
            buffer = io.BytesIO()
            draw_lens(image, maps[s : s + 1, j : j + 1], buffer, first=(s, j))
            buffer.seek(0)
            figures.append((Image.open(buffer).convert("RGB"), f"span {s} latent {j}"))
    return figures


def norms_markdown(inspection: Inspection) -> str:
    """The fed-latent norms against the image's mean visual-embedding norm, as a Markdown table."""
    visual = inspection.visual_embedding_norm
    lines = [f"Mean norm of this image's visual embeddings (what fills its image slots): **{visual:.4g}**", ""]
    if not inspection.num_spans:
        return "\n".join(lines + ["No latent span was generated: nothing was fed back."])
    lines += ["| span | latent | fed-latent norm | / visual-embedding norm |", "|---|---|---|---|"]
    for s, row in enumerate(inspection.latent_norms.tolist()):
        lines += [f"| {s} | {j} | {norm:.4g} | {norm / visual:.3f} |" for j, norm in enumerate(row)]
    return "\n".join(lines)


# ---- examples --------------------------------------------------------------------------------------------------------
def write_examples(folder: str, count: int = 2, seed: int = 0) -> list[list[str]]:
    """Boards of the synthetic shape task (`synthetic.make_shape_rows`) as PNGs with their questions, and
    `examples.json` listing them; returns [[image path, question], ...]."""
    from .synthetic import make_shape_rows

    os.makedirs(folder, exist_ok=True)
    listed = []
    for index, row in enumerate(make_shape_rows(num_rows=count, seed=seed, image_size=168)):
        name = f"board_{index}.png"
        row["images"][0].save(os.path.join(folder, name))
        listed.append([name, row["question"]])
    with open(os.path.join(folder, EXAMPLES_FILE), "w") as f:
        json.dump(listed, f, indent=1)
    return [[os.path.join(folder, name), question] for name, question in listed]


def read_examples(folder: str) -> list[list[str]]:
    """[[image path, question], ...] from `folder/examples.json`."""
    path = os.path.join(folder, EXAMPLES_FILE)
    with open(path) as f:
        listed = json.load(f)
    if not (isinstance(listed, list) and all(isinstance(e, list) and len(e) == 2 and all(isinstance(v, str) for v in e)
                                             for e in listed)):
        raise ValueError(f"{path} must hold a JSON list of [image file, question] pairs.")
    return [[os.path.join(folder, image), question] for image, question in listed]


# ---- the Space's files -----------------------------------------------------------------------------------------------
def package_requirement() -> str:
    """This package, pinned to the installed version, with its `[space]` extra."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"gap-vlm[space]=={version('gap-vlm')}"
    except PackageNotFoundError:  # run from a checkout that was never installed
        raise ValueError("the gap-vlm package is not installed (pip install -e .), so the Space cannot pin it: pass "
                         "--space_requirement") from None


def space_files(model_repo_id: str, revision: str, title: str = "GAP latent inspector", license: str | None = None,
                requirement: str | None = None) -> dict[str, bytes]:
    """What `gap push --space` commits, {path in the Space: bytes}: `app.py` (serves `model_repo_id` at `revision`),
    `requirements.txt` (`requirement`, default this package pinned), `README.md` (the Space card: `sdk: gradio`,
    `sdk_version`, `app_file`, `models:`) and `examples/` (two boards of the synthetic task, `examples.json`)."""
    import tempfile
    from importlib.resources import files as package_files

    from huggingface_hub import SpaceCard, SpaceCardData

    templates = package_files("trainers").joinpath("templates")
    requirement = requirement or package_requirement()
    app = templates.joinpath("space_app.py.tmpl").read_text(encoding="utf-8").format(
        model_repo_id=model_repo_id, revision=revision)
    card_data = SpaceCardData(
        title=title[:60], emoji="🔍", colorFrom="indigo", colorTo="gray", sdk="gradio", sdk_version=GRADIO_VERSION,
        app_file="app.py", python_version="3.11", models=[model_repo_id], license=license,
        tags=["gap", "visual-latent-reasoning", "latent-lens"],
        short_description="Latent spans, latent lens and interventions",
    )
    card = SpaceCard.from_template(card_data, template_str=templates.joinpath("space_card.md").read_text("utf-8"),
                                   title=title, model_repo_id=model_repo_id, revision=revision,
                                   requirement=requirement)
    published = {
        "app.py": app.encode(),
        "requirements.txt": (f"# The GAP latent inspector for {model_repo_id} at {revision}: this package, pinned.\n"
                             f"{requirement}\n").encode(),
        "README.md": str(card).encode(),
    }
    with tempfile.TemporaryDirectory() as folder:
        write_examples(folder)
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name), "rb") as f:
                published[f"examples/{name}"] = f.read()
    return published


# ---- the app ---------------------------------------------------------------------------------------------------------
def _settings(max_new_tokens, decoding, temperature, seed, max_latent_spans) -> InspectorConfig:
    """The page's controls (raw values: the events skip gradio's preprocessing) -> an `InspectorConfig`."""

    def whole(value, what):
        if value is None or value == "":
            return None
        number = float(value)
        if number != int(number):
            raise UploadError(f"{what} must be a whole number; got {value!r}.")
        return int(number)

    return InspectorConfig(max_new_tokens=whole(max_new_tokens, "max new tokens"), do_sample=decoding == "sampling",
                           temperature=float(temperature), seed=whole(seed, "seed") or 0,
                           max_latent_spans=whole(max_latent_spans, "max latent spans"))


def build_app(inspector: LatentInspector, examples: list[list[str]] = (), args: SpaceArguments | None = None):
    """The Gradio Blocks of the inspector (queued: one request runs on the model at a time, the others wait)."""
    import gradio as gr

    args = args or SpaceArguments(model_name_or_path=inspector.name)

    def image_of(payload):
        """The uploaded image from the raw FileData payload (its path is gradio's own upload cache)."""
        if not payload or not payload.get("path"):
            raise UploadError("Upload an image first (or pick an example).")
        return open_upload(payload["path"], args.max_upload_pixels, name=payload.get("orig_name"))

    def shown(error: Exception) -> Exception:
        """Errors for the page: ours as they are; anything else named in one line (the log has the traceback)."""
        if isinstance(error, UploadError):
            return gr.Error(str(error), print_exception=False)
        logger.exception("request failed")
        return gr.Error(f"Generation failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
                        print_exception=False)

    def check_upload(payload):
        try:
            image_of(payload)
        except UploadError as error:
            return f"**Upload refused.** {error}"
        return ""

    def run(payload, question, max_new_tokens, decoding, temperature, seed, max_spans, progress=gr.Progress()):
        try:
            config = _settings(max_new_tokens, decoding, temperature, seed, max_spans)
            image = image_of(payload)
            progress(0.1, desc="generating")
            inspection = inspector.inspect(image, question, config)
            progress(0.7, desc="drawing the latent lens")
            figures = lens_figures(image, inspection.maps)
        except Exception as error:  # noqa: BLE001 - every failure is a message in the page
            raise shown(error) from None
        return inspection.answer, inspection.segments, figures, norms_markdown(inspection)

    def compare(payload, question, max_new_tokens, decoding, temperature, seed, max_spans, chosen,
                progress=gr.Progress()):
        try:
            config = _settings(max_new_tokens, decoding, temperature, seed, max_spans)
            image = image_of(payload)
            if not chosen:
                raise UploadError("Tick at least one intervention to compare with the unchanged answer.")
            answers = inspector.answers_under(
                image, question, config, [c for c in SPACE_INTERVENTIONS if c in chosen],
                on_answer=lambda done, total, name: progress(done / total, desc=f"answer under {name}"))
        except Exception as error:  # noqa: BLE001
            raise shown(error) from None
        return [answers["none"]] + [answers.get(name, "(not run)") for name in SPACE_INTERVENTIONS]

    k = inspector.num_latent_tokens
    with gr.Blocks(title=f"GAP latent inspector: {inspector.name}") as demo:
        gr.Markdown(
            f"# GAP latent inspector\n`{inspector.name}`: a GAP model reasons partly in continuous vectors: "
            f"mid-answer it opens a latent span and feeds back K = {k} latents computed by its latent head. Ask a "
            "question about an image to see where each span opened, what each latent looks at (its cosine "
            "similarity to the image's visual tokens, as `gap latent-lens` draws it), how large the fed latents "
            "are against the image's own visual embeddings, and what the answer becomes when the latents are "
            "zeroed, replaced by noise, shuffled or dropped.")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", sources=["upload"], label="Image", elem_id="image")
                upload_status = gr.Markdown(elem_id="upload-status")
                question = gr.Textbox(label="Question", placeholder="What colour is the triangle?",
                                      elem_id="question")
                with gr.Accordion("Generation settings", open=True):
                    max_new_tokens = gr.Slider(1, 1024, value=args.max_new_tokens, step=1, label="max new tokens",
                                               elem_id="max-new-tokens")
                    decoding = gr.Radio(["greedy", "sampling"], value="greedy", label="decoding",
                                        elem_id="decoding")
                    temperature = gr.Slider(0.05, 2.0, value=1.0, step=0.05, label="temperature (sampling)")
                    seed = gr.Number(value=0, precision=0, label="seed (sampling, noise, shuffle)")
                    max_spans = gr.Number(value=args.max_latent_spans, precision=0, minimum=0,
                                          label="max latent spans (empty: no limit)", elem_id="max-spans")
                generate = gr.Button("Generate", variant="primary", elem_id="generate")
                if examples:
                    gr.Examples(examples, inputs=[image, question], label="Examples")
            with gr.Column():
                answer = gr.Textbox(label="Answer", interactive=False, elem_id="answer")
                marked = gr.HighlightedText(label="Answer with its latent spans", combine_adjacent=False,
                                            elem_id="marked")
                lens = gr.Gallery(label="Latent lens: one heatmap per latent (cosine similarity to visual tokens)",
                                  columns=min(k, 4), object_fit="contain", height=320, elem_id="lens")
                norms = gr.Markdown(elem_id="norms")
        gr.Markdown("## Interventions on the fed latents\nThe same settings and seed, with the fed latents "
                    "replaced: `zero` (zeros), `noise` (Gaussian noise at each latent's norm), `shuffle` (one fixed "
                    "permutation of the coordinates) or `drop` (no span opens).")
        with gr.Row():
            chosen = gr.CheckboxGroup(list(SPACE_INTERVENTIONS), value=list(SPACE_INTERVENTIONS),
                                      label="interventions", elem_id="interventions")
            compare_button = gr.Button("Compare answers", elem_id="compare")
        with gr.Row():
            compared = [gr.Textbox(label="unchanged", interactive=False, elem_id="answer-none")]
            compared += [gr.Textbox(label=name, interactive=False, elem_id=f"answer-{name}")
                         for name in SPACE_INTERVENTIONS]

        settings = [max_new_tokens, decoding, temperature, seed, max_spans]
        # preprocess=False: the handlers open the upload themselves, so a bad file gets our message, not a trace.
        image.upload(check_upload, [image], [upload_status], preprocess=False, queue=False)
        image.clear(lambda: "", None, [upload_status], queue=False)
        generate.click(run, [image, question, *settings], [answer, marked, lens, norms], preprocess=False,
                       concurrency_id="model", concurrency_limit=1, api_name="inspect")
        compare_button.click(compare, [image, question, *settings, chosen], compared, preprocess=False,
                             concurrency_id="model", concurrency_limit=1, api_name="compare")
    demo.queue(max_size=args.queue_size, default_concurrency_limit=1)
    return demo


def run_space(args: SpaceArguments):
    """`gap space`: load the checkpoint and serve the inspector until interrupted."""
    import tempfile

    import importlib.util

    if not args.model_name_or_path:
        raise ValueError("--model_name_or_path is required (a GAP checkpoint directory or Hub id).")
    if importlib.util.find_spec("gradio") is None:
        raise ValueError(f"the Space needs gradio, an optional dependency: pip install -e '.[space]' "
                         f"(gradio=={GRADIO_VERSION})")
    # Gradio reports usage over the network unless told not to; offline (and by default) it is not.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    inspector = LatentInspector.from_pretrained(args.model_name_or_path, revision=args.revision,
                                                trust_remote_code=args.trust_remote_code,
                                                allow_pickle_weights=args.allow_pickle_weights)
    folder = args.examples_dir
    if folder:
        examples = read_examples(folder)
    else:
        folder = tempfile.mkdtemp(prefix="gap-space-examples-")
        examples = write_examples(folder)
    demo = build_app(inspector, examples, args)
    demo.launch(server_name=args.host, server_port=args.port, share=False, max_file_size=f"{args.max_upload_mb}mb",
                allowed_paths=[os.path.abspath(folder)], show_error=True)


__all__ = [
    "GRADIO_VERSION",
    "InspectorConfig",
    "Inspection",
    "LatentInspector",
    "SPACE_INTERVENTIONS",
    "SpaceArguments",
    "UploadError",
    "build_app",
    "lens_figures",
    "norms_markdown",
    "open_upload",
    "read_examples",
    "package_requirement",
    "run_space",
    "space_files",
    "write_examples",
]
