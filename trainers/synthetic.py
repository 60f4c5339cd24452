"""An offline synthetic visual task in GAP's dataset schema, for tests, recipes and the demo.

Each image is a `grid x grid` board of small coloured squares on a grey background; one cell is framed in white.
The question asks for the colour of the framed square, so the answer depends on one small region, and the aux image
(the visual evidence of the latent span) is the crop of that cell, upscaled to `aux_size`. The assistant turn states
the intent before the span and the parser description after it:

    "The framed square is in row 2, column 1. <|latent|> It is red. Answer: red"

Columns: `images` (one image), `messages` (TRL's conversational vision format: every content a list of
`{"type", "text"}` parts), `aux_images` (one crop), `answer`, `question` (for `trainers.evaluation`, mapping "gap"),
and on request `use_latent` / `base_pass_rate` (random, for capacity experiments).
"""

import random

from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
    "purple": (150, 60, 190), "orange": (240, 140, 30), "cyan": (40, 200, 210), "pink": (240, 130, 190),
}
BACKGROUND = (128, 128, 128)
FRAME = (255, 255, 255)
QUESTION = "What colour is the square in the white frame?"


def draw_board(cells: list[list[str | None]], framed: tuple[int, int], image_size: int) -> Image.Image:
    """The board image: `cells[r][c]` colour names (None: an empty cell), the cell `framed` = (row, col) framed in
    white."""
    grid = len(cells)
    cell = image_size // grid
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    margin = max(cell // 4, 2)
    for r, row in enumerate(cells):
        for c, name in enumerate(row):
            if name is None:
                continue
            x0, y0 = c * cell, r * cell
            box = [x0 + margin, y0 + margin, x0 + cell - margin - 1, y0 + cell - margin - 1]
            draw.rectangle(box, fill=COLORS[name])
    r, c = framed
    box = [c * cell, r * cell, c * cell + cell - 1, r * cell + cell - 1]
    draw.rectangle(box, outline=FRAME, width=max(cell // 10, 1))
    return image


def crop_cell(image: Image.Image, cell_rc: tuple[int, int], grid: int, aux_size: int) -> Image.Image:
    """The crop of one cell, resized to `aux_size` squared (nearest neighbour: the colours stay exact)."""
    cell = image.size[0] // grid
    r, c = cell_rc
    return image.crop((c * cell, r * cell, (c + 1) * cell, (r + 1) * cell)).resize((aux_size, aux_size), Image.NEAREST)


def make_synthetic_rows(
    num_rows: int = 64,
    seed: int = 0,
    image_size: int = 56,
    grid: int = 2,
    num_colors: int = 4,
    aux_size: int = 56,
    use_latent_fraction: float | None = None,
    with_base_pass_rate: bool = False,
    distractors: bool = True,
) -> list[dict]:
    """The rows as plain dicts (PIL images); `make_synthetic_dataset` wraps them in a `datasets.Dataset`."""
    if not 1 <= num_colors <= len(COLORS):
        raise ValueError(f"num_colors must be in [1, {len(COLORS)}]; got {num_colors}.")
    if image_size // grid < 4:
        raise ValueError(f"image_size={image_size} is too small for a {grid}x{grid} grid.")
    rng = random.Random(seed)
    palette = list(COLORS)[:num_colors]
    rows = []
    for _ in range(num_rows):
        cells = [[rng.choice(palette) for _ in range(grid)] for _ in range(grid)]
        framed = (rng.randrange(grid), rng.randrange(grid))
        if not distractors:  # only the framed cell holds a square: locating it is easy, reading it is the task
            cells = [[name if (r, c) == framed else None for c, name in enumerate(row)] for r, row in enumerate(cells)]
        image = draw_board(cells, framed, image_size)
        answer = cells[framed[0]][framed[1]]
        assistant = (
            f"The framed square is in row {framed[0] + 1}, column {framed[1] + 1}. <|latent|> "
            f"It is {answer}. Answer: {answer}"
        )
        row = dict(
            images=[image],
            messages=[
                {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": QUESTION}]},
                {"role": "assistant", "content": [{"type": "text", "text": assistant}]},
            ],
            aux_images=[crop_cell(image, framed, grid, aux_size)],
            answer=answer,
            question=QUESTION,
        )
        if use_latent_fraction is not None:
            row["use_latent"] = rng.random() < use_latent_fraction
        if with_base_pass_rate:
            row["base_pass_rate"] = rng.choice([0.0, 0.25, 0.5, 0.75, 1.0])
        rows.append(row)
    return rows


def make_synthetic_dataset(
    num_rows: int = 64,
    seed: int = 0,
    image_size: int = 56,
    grid: int = 2,
    num_colors: int = 4,
    aux_size: int = 56,
    use_latent_fraction: float | None = None,
    with_base_pass_rate: bool = False,
    distractors: bool = True,
):
    """A `datasets.Dataset` of `num_rows` rows of the framed-square task (see the module docstring).

    Args:
        num_rows: rows to draw. seed: the random seed (same seed, same rows).
        image_size: side of the board image in pixels (the tiny image processor takes 56 to 112).
        grid: cells per side. num_colors: colours used (at most 8); chance is 1 / num_colors.
        aux_size: side of the aux crop. use_latent_fraction: add a random `use_latent` column, True with this
            probability. with_base_pass_rate: add a random `base_pass_rate` column (0, 0.25, ..., 1).
        distractors: fill every cell (default); False leaves all cells but the framed one empty.
    """
    import datasets

    rows = make_synthetic_rows(
        num_rows, seed, image_size, grid, num_colors, aux_size, use_latent_fraction, with_base_pass_rate,
        distractors,
    )
    features = {
        "images": datasets.List(datasets.Image()),
        "messages": datasets.List({
            "role": datasets.Value("string"),
            "content": datasets.List({"type": datasets.Value("string"), "text": datasets.Value("string")}),
        }),
        "aux_images": datasets.List(datasets.Image()),
        "answer": datasets.Value("string"),
        "question": datasets.Value("string"),
    }
    if use_latent_fraction is not None:
        features["use_latent"] = datasets.Value("bool")
    if with_base_pass_rate:
        features["base_pass_rate"] = datasets.Value("float32")
    columns = {name: [row[name] for row in rows] for name in features}
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


# ---- the named-shape task (the demo's study) -----------------------------------------------------------------------
SHAPES = ("circle", "square", "triangle", "cross", "diamond", "bar")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], color) -> None:
    """One filled `shape` inside `box` = (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=color)
    elif shape == "cross":
        t = max(w // 3, 1)
        draw.rectangle([cx - t / 2, y0, cx + t / 2, y1], fill=color)
        draw.rectangle([x0, cy - t / 2, x1, cy + t / 2], fill=color)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=color)
    elif shape == "bar":
        draw.rectangle([x0, cy - max(h // 6, 1), x1, cy + max(h // 6, 1)], fill=color)
    else:
        raise ValueError(f"unknown shape {shape!r}; the shapes are {SHAPES}.")


def shape_question(shape: str) -> str:
    return f"What colour is the {shape}?"


def shape_intent(shape: str, row: int, col: int, intent: str = "position") -> str:
    """The intent text before the span: where to look. `"position"`: "The triangle is in row 2, column 3." (from the
    question and the image); `"name"`: "Find the triangle." (from the question alone)."""
    if intent == "name":
        return f"Find the {shape}."
    if intent == "position":
        return f"The {shape} is in row {row + 1}, column {col + 1}."
    raise ValueError(f"intent must be 'position' or 'name'; got {intent!r}.")


def make_shape_rows(
    num_rows: int = 64,
    seed: int = 0,
    image_size: int = 84,
    grid: int = 3,
    num_shapes: int = 4,
    num_colors: int = 4,
    aux_size: int = 56,
    exclude_hashes: set | None = None,
    intent: str = "position",
) -> list[dict]:
    """Rows of the named-shape task: a `grid x grid` board on grey holds each of `num_shapes` shapes once, in random
    cells and random colours (repeats allowed), the other cells empty; the question names one shape ("What colour
    is the triangle?"), so the answer needs localisation among distractors. Chance is 1 / num_colors. The aux image
    is the crop of the named shape's cell. The assistant text:

        "The triangle is in row 2, column 3. <|latent|> Answer: red"      (intent="position")
        "Find the triangle. <|latent|> Answer: red"                         (intent="name")

    Boards are distinct within the call (the question image's bytes are hashed); boards whose hash is in
    `exclude_hashes` (a training split's) are redrawn, which keeps a test split disjoint from it. Extra columns:
    `shape`, `cell` ([row, col]), `image_hash`.
    """
    if not 1 <= num_colors <= len(COLORS):
        raise ValueError(f"num_colors must be in [1, {len(COLORS)}]; got {num_colors}.")
    if not 1 <= num_shapes <= min(len(SHAPES), grid * grid):
        raise ValueError(f"num_shapes must be in [1, {min(len(SHAPES), grid * grid)}]; got {num_shapes}.")
    if image_size // grid < 8:
        raise ValueError(f"image_size={image_size} is too small for a {grid}x{grid} grid.")
    rng = random.Random(seed)
    palette, shapes = list(COLORS)[:num_colors], list(SHAPES)[:num_shapes]
    seen = set(exclude_hashes or ())
    rows, attempts = [], 0
    cell = image_size // grid
    margin = max(cell // 6, 1)
    while len(rows) < num_rows:
        attempts += 1
        if attempts > 100 * num_rows + 1000:
            raise ValueError(f"could not draw {num_rows} distinct boards (grid {grid}, {num_shapes} shapes, "
                             f"{num_colors} colours): the task has too few distinct boards.")
        cells = rng.sample(range(grid * grid), num_shapes)
        colors = [rng.choice(palette) for _ in shapes]
        target = rng.randrange(num_shapes)
        image = Image.new("RGB", (image_size, image_size), BACKGROUND)
        draw = ImageDraw.Draw(image)
        for shape, index, color in zip(shapes, cells, colors):
            r, c = divmod(index, grid)
            draw_shape(draw, shape, (c * cell + margin, r * cell + margin, (c + 1) * cell - margin - 1,
                                     (r + 1) * cell - margin - 1), COLORS[color])
        digest = image_hash(image)
        if digest in seen:
            continue
        seen.add(digest)
        shape, (r, c), answer = shapes[target], divmod(cells[target], grid), colors[target]
        question = shape_question(shape)
        assistant = f"{shape_intent(shape, r, c, intent)} <|latent|> Answer: {answer}"
        rows.append(dict(
            images=[image],
            messages=[
                {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": question}]},
                {"role": "assistant", "content": [{"type": "text", "text": assistant}]},
            ],
            aux_images=[crop_cell(image, (r, c), grid, aux_size)],
            answer=answer, question=question, shape=shape, cell=[r, c], image_hash=digest,
        ))
    return rows


def image_hash(image: Image.Image) -> str:
    """SHA-256 of an image's mode, size and pixel bytes: equal exactly when two images are pixel-identical."""
    import hashlib

    digest = hashlib.sha256(f"{image.mode}{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


__all__ = [
    "COLORS", "QUESTION", "SHAPES", "crop_cell", "draw_board", "draw_shape", "image_hash", "make_shape_rows",
    "make_synthetic_dataset", "make_synthetic_rows", "shape_intent", "shape_question",
]
