"""The latent-inspector Space (`trainers.space`, `gap space`, `gap push --space`).

- The inspector's numbers are the library's: its answer is GAP `generate`'s with the same settings (greedy, seeded
  sampling, every intervention), its heatmaps are `gap latent-lens`'s, its visual-embedding norm is
  `gap diagnose-norms`'s.
- `gap push --space` against the local Hub (`hub_server.py`): one commit with the app, the pinned requirements, the
  Space card and the examples, no token; the model card links the Space.
- A real browser (Debian's chromium, driven by selenium through the system chromedriver) uses the app served by
  `gap space` on 127.0.0.1: upload, ask, read the answer, one heatmap per latent, the answer under `zero`, a
  non-image upload refused in the page; it saves a screenshot (`GAP_SPACE_SCREENSHOT=PATH` keeps a copy, e.g.
  docs/space.png).

The checkpoint is the tiny random GAP model with a generation config that makes it open a span (a bias on
`<|latent_start|>`) and write lowercase letters (every other token suppressed), saved with `save_pretrained`.
"""

import importlib.util
import json
import os
import shutil
import socket
import string
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest
import torch
import yaml

from testing_utils import HUB_TOKEN as TOKEN, ROOT, TINY_VARIANT as VARIANT, push

QUESTION = "What colour is the triangle?"
ANSWER_TOKENS = 16


def span_opening_gap(seed: int):
    """The tiny GAP model whose generation config opens a latent span whenever it may and writes only lowercase
    letters and spaces (or ends the turn)."""
    from trainers.tiny import build_tiny_gap

    model, processor = build_tiny_gap(seed=seed)
    tokenizer, config = processor.tokenizer, model.config
    keep = {i for i in range(len(tokenizer)) if tokenizer.decode([i]) in set(string.ascii_lowercase + " ")}
    keep |= {config.latent_start_token_id, tokenizer.eos_token_id}
    model.generation_config.sequence_bias = [[[config.latent_start_token_id], 100.0]]
    model.generation_config.suppress_tokens = [i for i in range(config.text_config.vocab_size) if i not in keep]
    return model.eval(), processor


def library_generate(model, processor, image, question=QUESTION, seed=None, **kwargs):
    """GAP `generate` on one image and question, as a user of the library writes it: (decoded answer, output)."""
    from trainers.evaluation import EvalRow, build_prompt

    processor.tokenizer.padding_side = "left"
    row = EvalRow(images=[image], question=question, answer="", choices=None, kind="text")
    inputs = processor(images=[image], text=[build_prompt(processor, row)], return_tensors="pt")
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**inputs, return_latents=True, **kwargs)
    return processor.decode(out.sequences[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True), out


@pytest.fixture(scope="module")
def space_setup(tmp_path_factory):
    """(checkpoint dir, example image path, PIL image, the model, its processor): the first seed whose answer
    changes when its latents are zeroed (a random model's answer need not depend on them), checked with the library."""
    from trainers.space import open_upload, write_examples

    root = tmp_path_factory.mktemp("space")
    image_path = write_examples(str(root / "examples"))[0][0]
    image = open_upload(image_path, max_pixels=10**6)
    for seed in range(8):
        model, processor = span_opening_gap(seed)
        settings = dict(max_new_tokens=ANSWER_TOKENS, do_sample=False, max_latent_spans=1)
        unchanged, _ = library_generate(model, processor, image, **settings)
        zeroed, _ = library_generate(model, processor, image, latent_intervention="zero", **settings)
        if unchanged.strip() and zeroed != unchanged:
            break
    else:
        pytest.fail("no tiny seed in 0-7 whose answer depends on its latents")
    model.save_pretrained(root / "checkpoint")
    processor.save_pretrained(root / "checkpoint")
    return str(root / "checkpoint"), image_path, image, model, processor


# ---- the numbers are the library's -----------------------------------------------------------------------------------
def test_the_inspector_answer_equals_gap_generate_greedy_sampled_and_under_each_intervention(space_setup):
    from trainers.space import SPACE_INTERVENTIONS, InspectorConfig, LatentInspector

    checkpoint, _, image, model, processor = space_setup
    inspector = LatentInspector.from_pretrained(checkpoint)  # loaded back, as `gap space` loads it
    for config in (InspectorConfig(max_new_tokens=ANSWER_TOKENS, max_latent_spans=1),
                   InspectorConfig(max_new_tokens=ANSWER_TOKENS, do_sample=True, temperature=0.7, seed=5,
                                   max_latent_spans=2)):
        seed = config.seed if config.do_sample else None
        sampling = dict(temperature=config.temperature) if config.do_sample else {}
        inspection = inspector.inspect(image, QUESTION, config)
        answer, out = library_generate(model, processor, image, seed=seed, max_new_tokens=config.max_new_tokens,
                                       do_sample=config.do_sample, max_latent_spans=config.max_latent_spans,
                                       latent_intervention_seed=config.seed, **sampling)
        assert inspection.answer == answer and inspection.num_spans == out.latents[0].shape[0] >= 1
        torch.testing.assert_close(inspection.latent_norms, out.latents[0].float().norm(dim=-1))
        # The marked text: the answer's text with one "[K latents]" marker per span.
        spans = [text for text, label in inspection.segments if label]
        assert spans == [f"[{model.config.num_latent_tokens} latents]"] * inspection.num_spans
        assert "".join(text for text, label in inspection.segments if not label) == answer

        chosen = ["noise"] if config.do_sample else list(SPACE_INTERVENTIONS)  # seeded noise under seeded sampling
        answers = inspector.answers_under(image, QUESTION, config, chosen)
        assert answers["none"] == answer and list(answers) == ["none", *chosen]
        if not config.do_sample:
            assert answers["drop"] != answers["none"]  # no span: another answer
        for name in chosen:
            expected, _ = library_generate(model, processor, image, seed=seed, latent_intervention=name,
                                           max_new_tokens=config.max_new_tokens, do_sample=config.do_sample,
                                           max_latent_spans=config.max_latent_spans,
                                           latent_intervention_seed=config.seed, **sampling)
            assert answers[name] == expected, name


def test_the_inspector_heatmaps_equal_gap_latent_lens_and_its_norm_gap_diagnose_norms(space_setup, tmp_path):
    import datasets

    from trainers.arguments import EvalArguments
    from trainers.diagnostics import diagnose, run_latent_lens
    from trainers.evaluation import EvalRow
    from trainers.space import InspectorConfig, LatentInspector, lens_figures, norms_markdown

    checkpoint, image_path, image, model, processor = space_setup
    features = datasets.Features({"images": datasets.List(datasets.Image()), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    datasets.Dataset.from_dict(dict(images=[[image_path]], question=[QUESTION], answer=["red"]),
                               features=features).save_to_disk(str(tmp_path / "split"))
    # `gap latent-lens` (its stage function, in this process) runs greedy with no span limit: the model opens a span
    # wherever it may.
    run_latent_lens(EvalArguments(model_name_or_path=checkpoint, dataset_name=str(tmp_path / "split"),
                                  max_new_tokens=ANSWER_TOKENS, output_dir=str(tmp_path / "lens")))
    (report,) = json.load(open(tmp_path / "lens" / "lens.json"))

    inspector = LatentInspector.from_pretrained(checkpoint)
    inspection = inspector.inspect(image, QUESTION, InspectorConfig(max_new_tokens=ANSWER_TOKENS))
    assert inspection.answer == report["generated"]
    # 168 px boards resized to the tiny processor's 112 px: 8x8 patches, 4x4 visual tokens after the 2x2 merge.
    assert inspection.num_spans >= 2 and list(inspection.maps.shape[1:]) == [model.config.num_latent_tokens, 4, 4]
    torch.testing.assert_close(inspection.maps, torch.tensor(report["maps"]), rtol=0, atol=1e-6)

    row = EvalRow(images=[image], question=QUESTION, answer="red", choices=None, kind="text")
    norms = diagnose(model, processor, [row])
    assert inspection.visual_embedding_norm == pytest.approx(norms["visual_input_embedding_norm"], rel=1e-5)
    table = norms_markdown(inspection)
    assert f"**{inspection.visual_embedding_norm:.4g}**" in table
    assert table.count("\n| ") == 1 + inspection.latent_norms.numel()  # header + one row per fed latent

    figures = lens_figures(image, inspection.maps)
    assert [caption for _, caption in figures][:2] == ["span 0 latent 0", "span 0 latent 1"]
    assert len(figures) == inspection.latent_norms.numel() and figures[0][0].size[0] > 150


@pytest.mark.parametrize("truncated_allowed_elsewhere", [False, True])
def test_a_bad_upload_or_setting_is_one_clear_message(tmp_path, monkeypatch, truncated_allowed_elsewhere):
    from PIL import Image, ImageFile

    # lmms-eval (installed beside the package) sets PIL's global flag at import: the app must not depend on it.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", truncated_allowed_elsewhere)

    from trainers.space import InspectorConfig, UploadError, open_upload

    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(UploadError, match=r"'notes.txt' is not an image this app can read: upload a PNG"):
        open_upload(str(tmp_path / "notes.txt"), max_pixels=10**6)
    Image.new("RGB", (300, 200), "red").save(tmp_path / "big.png")
    with pytest.raises(UploadError, match=r"300x200 pixels .*at most 0.01 Mpx: downscale it"):
        open_upload(str(tmp_path / "big.png"), max_pixels=10_000)
    Image.new("RGB", (600, 2), "red").save(tmp_path / "thin.png")
    with pytest.raises(UploadError, match=r"sides differ by at most 200x"):
        open_upload(str(tmp_path / "thin.png"), max_pixels=10**6)
    (tmp_path / "cut.png").write_bytes((tmp_path / "big.png").read_bytes()[:200])
    with pytest.raises(UploadError, match=r"'cut.png' could not be decoded .*truncated or corrupt"):
        open_upload(str(tmp_path / "cut.png"), max_pixels=10**6)
    assert open_upload(str(tmp_path / "big.png"), max_pixels=10**6).size == (300, 200)
    with pytest.raises(UploadError, match="temperature must be > 0 when sampling"):
        InspectorConfig(do_sample=True, temperature=0.0)
    with pytest.raises(UploadError, match="max latent spans must be a whole number >= 0"):
        InspectorConfig(max_latent_spans=-1)


def test_the_core_package_imports_gradio_only_inside_the_app_builder():
    """Static: no module of the package imports gradio at module level (a fresh interpreter would cost ~5 s)."""
    import ast

    for package in ("trainers", "modeling_gap"):
        for name in sorted(os.listdir(os.path.join(ROOT, package))):
            if not name.endswith(".py"):
                continue
            tree = ast.parse(open(os.path.join(ROOT, package, name)).read())
            for node in ast.walk(tree):
                imported = ([a.name for a in node.names] if isinstance(node, ast.Import)
                            else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                if any(module.split(".")[0] == "gradio" for module in imported):
                    where = f"{package}/{name}:{node.lineno}"
                    assert name == "space.py", f"{where} imports gradio"
                    assert node.col_offset > 0, f"{where} imports gradio at module level"


# ---- gap push --space ------------------------------------------------------------------------------------------------
def test_push_space_publishes_the_app_card_requirements_and_examples_in_one_commit_without_the_token(
        hub, space_setup, tmp_path):
    from PIL import Image

    from trainers.space import GRADIO_VERSION

    checkpoint = space_setup[0]
    done = push(hub, tmp_path, "--variant", VARIANT, "--checkpoint", checkpoint, "--repo-id", "acme/gap-inspected",
                "--space", "acme/gap-inspector")
    assert done.returncode == 0, done.stderr[-3000:]
    model_sha = hub.repo("acme/gap-inspected").branches["main"]
    space = hub.repo("acme/gap-inspector", "space")
    assert space.private and len(space.history()) == 2  # the repo's first commit, then one commit
    files = hub.files("acme/gap-inspector", "space")
    assert set(files) == {".gitattributes", "app.py", "requirements.txt", "README.md", "examples/examples.json",
                          "examples/board_0.png", "examples/board_1.png"}
    assert f"published Space acme/gap-inspector at {space.branches['main']}" in done.stdout
    assert "acme/gap-inspected is private: give the Space a read token as its secret HF_TOKEN" in done.stdout

    card = files["README.md"].decode()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["sdk"] == "gradio" and metadata["sdk_version"] == GRADIO_VERSION
    assert metadata["app_file"] == "app.py" and metadata["models"] == ["acme/gap-inspected"]
    assert metadata["license"] == "apache-2.0" and len(metadata["short_description"]) <= 60
    assert f"loaded at its commit `{model_sha}`" in card
    app = files["app.py"].decode()
    compile(app, "app.py", "exec")
    assert "model_name_or_path='acme/gap-inspected'" in app and f"revision={model_sha!r}" in app
    from importlib.metadata import version

    requirements = [line for line in files["requirements.txt"].decode().splitlines() if not line.startswith("#")]
    assert requirements == [f"gap-vlm[space]=={version('gap-vlm')}"]
    listed = json.loads(files["examples/examples.json"])
    assert [name for name, _ in listed] == ["board_0.png", "board_1.png"] and all(q.endswith("?") for _, q in listed)
    with tempfile.TemporaryDirectory() as folder:
        open(os.path.join(folder, "b.png"), "wb").write(files["examples/board_0.png"])
        assert Image.open(os.path.join(folder, "b.png")).size == (168, 168)

    model_card = hub.files("acme/gap-inspected")["README.md"].decode()
    assert "(https://huggingface.co/spaces/acme/gap-inspector)" in model_card
    assert not any(TOKEN.encode() in content for content in files.values())
    assert TOKEN not in done.stdout + done.stderr

    # --space alone, with the package from a pinned git URL: the Space is published again for the model repo's head,
    # one more commit on top.
    source = "gap-vlm[space] @ git+https://example.org/acme/gap@0123abc"
    again = push(hub, tmp_path, "--variant", VARIANT, "--repo-id", "acme/gap-inspected", "--space",
                 "acme/gap-inspector", "--space_requirement", source)
    assert again.returncode == 0, again.stderr[-3000:]
    history = hub.repo("acme/gap-inspector", "space").history()
    assert len(history) == 3 and history[0].parent == history[1].sha
    files = hub.files("acme/gap-inspector", "space")
    assert f"revision={model_sha!r}" in files["app.py"].decode()
    assert files["requirements.txt"].decode().splitlines()[1:] == [source]
    assert hub.repo("acme/gap-inspected").branches["main"] == model_sha  # the model was not pushed again

    # The pyproject's [space] extra pins the gradio the card names.
    pyproject = open(os.path.join(ROOT, "pyproject.toml")).read()
    assert f'space = ["gradio=={GRADIO_VERSION}"]' in pyproject


def test_a_token_in_the_space_files_or_a_bad_space_id_stops_the_push_before_any_request(hub, space_setup):
    from trainers import hub as push_to_hub
    from trainers.arguments import PushArguments

    def refused(**kwargs):
        before = len(hub.requests)
        with pytest.raises(push_to_hub.PushError) as err:
            push_to_hub.push(PushArguments(variant=VARIANT, checkpoint=space_setup[0], repo_id="acme/gap-leak",
                                           token=TOKEN, **kwargs))
        assert len(hub.requests) == before and TOKEN not in str(err.value)  # nothing was sent
        return str(err.value)

    message = refused(space="acme/gap-leak-space", space_requirement=f"gap-vlm @ https://x:{TOKEN}@example.org/g.whl")
    assert message.startswith("push to acme/gap-leak-space failed at step 'check the Space files'")
    assert "the Space file requirements.txt contains the Hub token" in message
    assert refused(space="no-org") == "--space must be ORG/NAME; got 'no-org'."


# ---- a real browser --------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served_space(space_setup, tmp_path_factory):
    """`gap space` on 127.0.0.1 (a free port) serving the checkpoint: (url, log path)."""
    if importlib.util.find_spec("gradio") is None:
        pytest.skip("gradio is not installed: `make install-space` (pip install -e '.[space-test]')")
    port = free_port()
    log = tmp_path_factory.mktemp("served") / "space.log"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               GRADIO_TEMP_DIR=str(log.parent / "gradio"))
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "trainers.cli", "space", "--model_name_or_path", space_setup[0], "--host",
             "127.0.0.1", "--port", str(port), "--max_latent_spans", "1", "--max_new_tokens", str(ANSWER_TOKENS)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 120
        while True:
            assert server.poll() is None, f"gap space exited: {log.read_text()[-3000:]}"
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                assert time.time() < deadline, f"gap space did not answer in 120 s: {log.read_text()[-3000:]}"
                time.sleep(0.5)
        yield url, log
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    if importlib.util.find_spec("selenium") is None:
        pytest.skip("selenium is not installed: `make install-space` (pip install -e '.[space-test]')")
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("Debian's chromium and chromium-driver are not installed: `make install-space` (apt-get)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    profile = tempfile.mkdtemp(prefix="gap-space-chromium-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                 "--window-size=1400,1900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_in_a_browser_upload_ask_read_the_answer_heatmaps_and_the_zeroed_answer(space_setup, served_space, browser,
                                                                                tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _, image_path, image, model, processor = space_setup
    url, log = served_space
    settings = dict(max_new_tokens=ANSWER_TOKENS, do_sample=False, max_latent_spans=1)
    expected, out = library_generate(model, processor, image, **settings)
    expected_zero, _ = library_generate(model, processor, image, latent_intervention="zero", **settings)
    k = model.config.num_latent_tokens

    wait = WebDriverWait(browser, 60)
    css = lambda selector: browser.find_element(By.CSS_SELECTOR, selector)  # noqa: E731
    value = lambda selector: css(selector).get_attribute("value")  # noqa: E731
    browser.get(url)
    wait.until(lambda _: browser.find_elements(By.CSS_SELECTOR, "#image input[type=file]"))
    css("#image input[type=file]").send_keys(image_path)
    wait.until(lambda _: browser.find_elements(By.CSS_SELECTOR, "#image img"))  # the upload is in before we click
    css("#question textarea").send_keys(QUESTION)
    css("#generate").click()
    wait.until(lambda _: value("#answer textarea"))
    assert value("#answer textarea") == expected
    wait.until(lambda _: len(browser.find_elements(By.CSS_SELECTOR, "#lens img")) >= k)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#lens img")) == k * out.latents[0].shape[0] == k
    assert "latent span 0" in css("#marked").text.lower()
    assert "fed-latent norm" in css("#norms").text

    for name in ("noise", "shuffle", "drop"):  # compare the unchanged answer with `zero` only
        browser.find_element(By.XPATH, f"//*[@id='interventions']//label[normalize-space(.)='{name}']").click()
    css("#compare").click()
    wait.until(lambda _: value("#answer-zero textarea"))
    assert value("#answer-none textarea") == expected and value("#answer-zero textarea") == expected_zero
    assert expected_zero != expected and value("#answer-noise textarea") == "(not run)"
    shot = tmp_path / "space.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 50_000
    if os.environ.get("GAP_SPACE_SCREENSHOT"):
        shutil.copy(shot, os.environ["GAP_SPACE_SCREENSHOT"])

    # A file that is not an image: named .png it reaches the app, which says so in the page; named .txt the page
    # itself refuses it (gradio checks the extension before uploading).
    (tmp_path / "fake.png").write_text("not an image")
    css("#image button[aria-label='Remove Image']").click()
    wait.until(lambda _: browser.find_elements(By.CSS_SELECTOR, "#image input[type=file]"))
    css("#image input[type=file]").send_keys(str(tmp_path / "fake.png"))
    wait.until(lambda _: "Upload refused" in css("#upload-status").text)
    assert "'fake.png' is not an image this app can read: upload a PNG" in css("#upload-status").text
    css("#generate").click()  # generating anyway: the same message, as an error in the page
    wait.until(lambda _: "is not an image this app can read" in css("body").text.split("Upload refused", 1)[1])
    (tmp_path / "notes.txt").write_text("not an image")
    css("#image button[aria-label='Remove Image']").click()
    wait.until(lambda _: browser.find_elements(By.CSS_SELECTOR, "#image input[type=file]"))
    css("#image input[type=file]").send_keys(str(tmp_path / "notes.txt"))
    wait.until(lambda _: "Invalid file type: notes.txt" in css("body").text)
    assert "Traceback" not in css("body").text and "Traceback" not in log.read_text()


def test_concurrent_requests_are_queued_and_all_answered(space_setup, served_space):
    """Four clients at once (gradio's own client, over the queue): each gets the same answer as the library."""
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client, handle_file

    _, image_path, image, model, processor = space_setup
    expected, _ = library_generate(model, processor, image, max_new_tokens=ANSWER_TOKENS, do_sample=False,
                                   max_latent_spans=1)
    client = Client(served_space[0], verbose=False)

    def ask(_):
        return client.predict(handle_file(image_path), QUESTION, ANSWER_TOKENS, "greedy", 1.0, 0, 1,
                              api_name="/inspect")[0]

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(ask, range(4))) == [expected] * 4
