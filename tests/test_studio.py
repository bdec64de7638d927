"""The studio: its handlers through FastAPI's TestClient (fast, always) and the page in headless
Chromium (upload, prompt, generate, two result images, a screenshot)."""

from __future__ import annotations

import base64
import io
import os
import shutil
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

from stages.common import dataset
from stages.common.io import load_rgb
from fashion.studio import Studio, app
from tests.conftest import image_diff

pytest.importorskip("fastapi", reason="the studio extra: pip install -e '.[studio]'")


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(open(path, "rb").read()).decode()


def decode(url: str) -> np.ndarray:
    assert url.startswith("data:image/png;base64,")
    return np.array(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))


@pytest.fixture
def client(finished_project):
    from fastapi.testclient import TestClient

    return TestClient(app(Studio()))


def test_the_page_and_its_defaults(client, finished_project):
    p = finished_project
    assert "<title>fashion studio</title>" in client.get("/").text
    info = client.get("/api/info").json()
    prompts = [c["prompt"] for c in dataset.load_eval_configs(p.path("eval_data"))]
    assert info["presets"] == list(dict.fromkeys(prompts)) and info["samples"]
    assert info["models_problem"] is None and info["resolution"] == p.params["extract"]["resolution"]
    assert info["defaults"]["steps"] == p.params["generate"]["steps"]
    assert info["defaults"]["low"] == p.params["canny"]["low_threshold"]


def test_an_eval_photo_gives_what_the_generate_stages_gave(client, finished_project):
    """An eval sample through the page's handlers: its eval edge map exactly, and the stages'
    baseline and LoRA images for its seed."""
    p = finished_project
    paths = p.typed().paths
    sample = client.get("/api/sample", params={"seed": 3}).json()
    index = sample["index"]
    assert sample["prompt"] == next(c["prompt"] for c in dataset.load_eval_configs(paths.eval_data)
                                    if c["index"] == index)
    assert np.array_equal(decode(sample["image"]), load_rgb(dataset.gt_path(paths.eval_data, index)))

    request = {"image": sample["image"], "name": sample["name"], "mode": "photo", "prompt": sample["prompt"],
               "low": p.params["canny"]["low_threshold"], "high": p.params["canny"]["high_threshold"],
               "steps": p.params["generate"]["steps"], "guidance": p.params["generate"]["guidance_scale"],
               "seed": sample["seed"], "count": 2, "lora_scale": p.params["generate"]["lora_scale"]}
    assert sample["seed"] == p.params["generate"]["seed"] + index, "the page offers the stages' seed"
    preview = client.post("/api/edges", json=request).json()
    assert np.array_equal(decode(preview["edges"]), load_rgb(dataset.edge_path(paths.edges, index)))
    assert preview["notes"] == []

    answer = client.post("/api/generate", json=request)
    assert answer.status_code == 200, answer.text
    made = answer.json()
    assert [r["seed"] for r in made["results"]] == [request["seed"], request["seed"] + 1]
    first = made["results"][0]
    for variant in dataset.VARIANTS:  # the stage drew it in a batch of 4: +-2 on uint8 on a CPU
        assert image_diff(decode(first[variant]), load_rgb(dataset.generated_path(paths, variant, index))) <= 2
    assert not np.array_equal(decode(first["lora"]), decode(made["results"][1]["lora"])), "seeds differ"
    resolution = p.params["extract"]["resolution"]
    assert decode(made["sheet"]).shape == (2 * resolution, 3 * resolution, 3)

    higher = client.post("/api/edges", json={**request, "low": 900, "high": 1000}).json()
    assert (decode(higher["edges"]) > 127).sum() < (decode(preview["edges"]) > 127).sum(), "the sliders move edges"


def test_a_large_sketch_is_resized_and_said_so(client, finished_project, tmp_path):
    sketch = np.full((300, 200, 3), 255, np.uint8)
    sketch[50:250, 60] = sketch[50:250, 140] = 0
    Image.fromarray(sketch).save(tmp_path / "sketch.png")
    answer = client.post("/api/edges", json={"image": data_url(tmp_path / "sketch.png"), "mode": "sketch"}).json()
    resolution = finished_project.params["extract"]["resolution"]
    assert decode(answer["edges"]).shape == (resolution, resolution, 3)
    assert answer["notes"][0].startswith("is 200x300; centre-cropped and resized")
    assert "inverted to white edges on black" in answer["notes"][1]


def test_errors_are_one_line_in_the_answer(client, finished_project, tmp_path):
    p = finished_project
    gt = data_url(dataset.gt_path(p.path("eval_data"), 0))
    ok = {"image": gt, "name": "dress.png", "prompt": "Dress in red", "steps": 1}

    def error(body, status, path="/api/generate"):
        answer = client.post(path, json=body)
        assert answer.status_code == status, answer.text
        message = answer.json()["error"]
        assert "\n" not in message
        return message

    assert error({**ok, "prompt": "   "}, 400).startswith("prompt: empty")
    text = "data:image/png;base64," + base64.b64encode(b"these are my notes").decode()
    assert error({**ok, "image": text, "name": "notes.png"}, 400) == \
        "notes.png: not a readable image (cannot identify image file); give a PNG or JPEG photo or sketch"
    assert error({**ok, "image": "data:image/png;base64,@@@"}, 400).startswith("dress.png: the upload is not valid")
    assert error({**ok, "image": "data:image/png;base64,"}, 400).startswith("dress.png: empty upload")
    assert error({**ok, "count": 99}, 422) == "count: Input should be less than or equal to 8"
    assert error({**ok, "low": 300, "high": 100}, 400).startswith("canny thresholds: low 300 > high 100")
    assert error({"prompt": "Dress"}, 422) == "image: Field required"

    shutil.rmtree(p.path("lora"))
    message = error(ok, 503)
    assert message == "models/lora: not found; run `make demo` (tiny models) or `dvc pull` first"
    assert client.get("/api/info").json()["models_problem"] == message
    shutil.rmtree(p.path("eval_data"))
    answer = client.get("/api/sample")
    assert answer.status_code == 400 and answer.json()["error"].startswith("data/eval: no eval set yet")


def test_the_knobs_reach_the_pipeline(client, finished_project):
    p = finished_project
    request = {"image": data_url(dataset.gt_path(p.path("eval_data"), 0)), "prompt": "Sleeveless dress in red",
               "seed": 11, "count": 5}  # more than generate.batch_size (4): two pipeline calls
    made = client.post("/api/generate", json=request).json()["results"]
    assert [r["seed"] for r in made] == list(range(11, 16))
    off = client.post("/api/generate", json={**request, "count": 1, "lora_scale": 0}).json()["results"][0]
    assert image_diff(decode(off["lora"]), decode(off["baseline"])) <= 1, "LoRA scale 0 is the baseline"
    assert image_diff(decode(off["baseline"]), decode(made[0]["baseline"])) <= 2, "seed 11 in any batch"
    assert image_diff(decode(made[0]["lora"]), decode(made[0]["baseline"])) > 2, "scale 1 is not"
    for knob in ({"steps": 2}, {"guidance": 1.0}):
        other = client.post("/api/generate", json={**request, "count": 1, **knob}).json()["results"][0]
        assert image_diff(decode(other["baseline"]), decode(made[0]["baseline"])) > 2, knob


def test_models_reload_when_the_lora_changes(client, finished_project, monkeypatch):
    from fashion import studio

    loads = []
    real = studio.load_pipeline
    monkeypatch.setattr(studio, "load_pipeline", lambda *a, **k: loads.append(1) or real(*a, **k))
    request = {"image": data_url(dataset.gt_path(finished_project.path("eval_data"), 0)), "prompt": "Dress",
               "steps": 1}
    for _ in range(2):
        assert client.post("/api/generate", json=request).status_code == 200
    assert len(loads) == 1, "loaded once"
    weights = finished_project.path("lora") / "pytorch_lora_weights.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10 ** 9))  # a new dvc repro
    assert client.post("/api/generate", json=request).status_code == 200
    assert len(loads) == 2, "loaded again"


def test_crashes_and_huge_images_are_one_line(finished_project, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    studio = Studio()
    monkeypatch.setattr(studio, "info", lambda: (_ for _ in ()).throw(RuntimeError("boom\nsecond line")))
    client = TestClient(app(studio), raise_server_exceptions=False)
    answer = client.get("/api/info")
    assert answer.status_code == 500
    assert answer.json()["error"] == "RuntimeError: boom second line (the terminal has the traceback)"
    assert client.get("/api/nothing").json()["error"] == "404: Not Found"
    Image.new("L", (8000, 7000)).save(tmp_path / "huge.png")  # 56 megapixels, a few kB of zeros
    answer = client.post("/api/edges", json={"image": data_url(tmp_path / "huge.png"), "name": "huge.png"})
    assert answer.status_code == 400 and answer.json()["error"].startswith("huge.png: 8000x7000 is more than 50")
    answer = client.post("/api/edges", json={"image": "data:image/png;base64", "name": "x.png"})
    assert answer.json()["error"].startswith("x.png: the upload is not a data URL with a payload")


@pytest.fixture
def server(finished_project):
    """The studio on a free localhost port, served by uvicorn in a thread."""
    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    served = uvicorn.Server(uvicorn.Config(app(Studio()), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=served.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not served.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    served.should_exit = True
    thread.join(10)


@pytest.mark.browser
def test_studio_in_headless_chromium(server, chromium, finished_project, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver, p = chromium, finished_project
    wait = WebDriverWait(driver, 120)
    photo = tmp_path / "photo.png"  # an eval photo at 4x, as a user's larger upload
    Image.open(dataset.gt_path(p.path("eval_data"), 1)).resize((256, 256), Image.Resampling.LANCZOS).save(photo)
    driver.set_window_size(1280, 900)
    driver.get(server)
    wait.until(lambda d: d.find_element(By.ID, "steps").get_attribute("value"))

    driver.find_element(By.ID, "generate").click()  # nothing uploaded yet: said in the page
    assert "upload a photo or sketch" in driver.find_element(By.ID, "error").text

    driver.find_element(By.ID, "file").send_keys(str(photo))
    wait.until(lambda d: d.execute_script("const i = document.getElementById('edge-preview');"
                                          "return i.complete && i.naturalWidth > 0"))
    assert "resized to the model's" in driver.find_element(By.ID, "notes").text

    driver.find_element(By.ID, "generate").click()  # an empty prompt: the server's one line, in the page
    wait.until(lambda d: d.find_element(By.ID, "error").text)
    assert driver.find_element(By.ID, "error").text.startswith("prompt: empty")

    from selenium.webdriver.support.ui import Select

    presets = Select(driver.find_element(By.ID, "presets"))
    presets.select_by_index(1)
    assert driver.find_element(By.ID, "prompt").get_attribute("value") == presets.first_selected_option.text
    count = driver.find_element(By.ID, "count")
    count.clear()
    count.send_keys("2")
    driver.find_element(By.ID, "generate").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results img.generated")) == 4
               or d.find_element(By.ID, "error").is_displayed())
    assert not driver.find_element(By.ID, "error").is_displayed(), driver.find_element(By.ID, "error").text
    loaded = driver.execute_script("return Array.from(document.querySelectorAll('#results img.generated'))"
                                   ".map(i => [i.complete && i.naturalWidth, i.alt])")
    assert all(width for width, _ in loaded), loaded
    assert [alt for _, alt in loaded][:2] == ["baseline, seed 0", "LoRA, seed 0"]
    assert not driver.find_element(By.ID, "error").is_displayed()
    sheet = decode(driver.find_element(By.ID, "download").get_attribute("href"))
    resolution = p.params["extract"]["resolution"]
    assert sheet.shape == (2 * resolution, 3 * resolution, 3)

    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, height + 200)  # the whole page: the window's frame is not all viewport
    wait.until(lambda d: d.execute_script("return window.innerHeight") >= height)
    driver.execute_script("window.scrollTo(0, 0)")
    screenshot = os.environ.get("FASHION_STUDIO_SCREENSHOT", str(tmp_path / "studio.png"))
    assert driver.save_screenshot(screenshot)
    with Image.open(screenshot) as shot:
        assert shot.width >= 1200 and np.asarray(shot.convert("L")).std() > 20, "the page is not blank"

    driver.find_element(By.ID, "sample").click()  # an eval sample: its prompt and the stages' seed for it
    wait.until(lambda d: d.execute_script("return document.getElementById('file').value") == "")  # the upload gone
    configs = {c["prompt"]: c["index"] for c in dataset.load_eval_configs(p.path("eval_data"))}
    index = configs[driver.find_element(By.ID, "prompt").get_attribute("value")]
    assert int(driver.find_element(By.ID, "seed").get_attribute("value")) == p.params["generate"]["seed"] + index
