"""Image classification end to end on a tiny random ViT and images drawn in the test: the real pipeline, the
export under plain transformers' pipeline(), predict, serve (base64 and multipart), bad images, and the offline
default EfficientNet-Lite0."""
import base64
import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tuneforge.cli import main
from tuneforge.config import parse_config
from tuneforge.pipeline import run

COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (50, 60, 210)}


def _image(label: str, rng: np.random.Generator, size: int = 24, mode: str = "RGB") -> Image.Image:
    """A noisy square of the class colour with a random bright bar: easy to learn, no two alike."""
    base = np.array(COLOURS[label], dtype=np.float32)
    arr = base + rng.normal(0, 25, size=(size, size, 3))
    r = int(rng.integers(0, size - 4))
    arr[r:r + 3, :, :] = 255
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img.convert(mode) if mode != "RGB" else img


def write_folder(root, per_class: int, seed: int = 0, fmt: str = "PNG"):
    rng = np.random.default_rng(seed)
    for label in COLOURS:
        (root / label).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            _image(label, rng).save(root / label / f"{k}.{fmt.lower()}", format=fmt)
    return root


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory):
    """A 2-layer ViT (hidden 32) for 32x32 images with its image processor, saved as a Hugging Face directory."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    path = tmp_path_factory.mktemp("tiny-vit")
    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=2)
    ViTForImageClassification(config).save_pretrained(path, safe_serialization=True)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def _config(data, model, out, **task):
    return parse_config({"task": {"type": "image-classification", **task},
                         "data": {"path": str(data), "val_fraction": 0.2, "test_fraction": 0.25},
                         "model": {"name": str(model)},
                         "train": {"method": "full", "epochs": 4, "batch_size": 8, "learning_rate": 3e-3,
                                   "early_stopping_patience": 0},
                         "eval": {"bootstrap_samples": 50, "batch_size": 16}, "output": {"dir": str(out)}})


@pytest.fixture(scope="module")
def image_run(tmp_path_factory, tiny_vit_dir):
    d = tmp_path_factory.mktemp("images")
    data = write_folder(d / "photos", 24)
    metrics = run(_config(data, tiny_vit_dir, d / "out", augment=["crop", "jitter"]))
    return d / "out", metrics, data


def test_the_pipeline_learns_the_classes_and_beats_the_baselines(image_run):
    out, metrics, _ = image_run
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["test"]["model"]["accuracy"] == metrics["test"]["model"]["accuracy"]
    assert set(saved["test"]["baselines"]) == {"majority", "pixel_logreg", "frozen_probe"}
    assert saved["test"]["model"]["accuracy"] > saved["test"]["baselines"]["majority"]["accuracy"] + 0.3
    assert saved["labels"] == sorted(COLOURS)
    report = json.loads((out / "data_report.json").read_text())
    assert report["image_size"] == 32 and sum(s["rows"] for s in report["splits"].values()) == 72
    assert (out / "model" / "model.safetensors").is_file() and not list((out / "model").glob("*.bin"))
    html = (out / "report.html").read_text()
    assert "Examples per class" in html and "data:image/png;base64," in html
    card = (out / "model" / "README.md").read_text()
    assert "pipeline_tag: image-classification" in card and 'pipeline("image-classification"' in card
    assert "efficientnet_lite_pytorch" not in card  # a ViT's card shows how plain transformers loads it, only that
    issues = json.loads((out / "audit.json").read_text())["label_issues"]
    assert "frozen features of" in issues["method"]  # on what the pre-trained model sees, not on raw thumbnails


def test_plain_transformers_pipeline_gives_tuneforges_labels(image_run):
    from transformers import pipeline

    out, _, data = image_run
    files = sorted((data / "blue").glob("*.png"))[:4]
    classify = pipeline("image-classification", model=str(out / "model"))
    ours = json.loads((out / "model" / "config.json").read_text())["id2label"]
    top = [r[0]["label"] for r in classify([Image.open(f) for f in files])]
    assert set(top) <= set(ours.values())
    from tuneforge.tasks.image_classification.predictor import ImagePredictor

    mine = [r["label"] for r in ImagePredictor.load(out / "model").predict(files)]
    assert mine == top  # the same decisions: the exported processor resizes and normalises as tuneforge does


def test_predict_reads_image_files_and_folders(image_run, capsys):
    out, _, data = image_run
    assert main(["predict", str(out), "--image", str(data / "red" / "0.png"), "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert line["image"].endswith("0.png") and set(line["probabilities"]) == set(COLOURS)
    assert main(["predict", str(out), "--input", str(data / "green"), "--json"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 24


def test_serving_labels_base64_and_multipart_images_and_refuses_bad_ones(image_run, tmp_path):
    from tuneforge.serving.app import ServeSettings, create_app, run_predictor
    from tuneforge.serving.monitor import load_reference

    out, _, data = image_run
    raw = (data / "red" / "1.png").read_bytes()
    b64 = base64.b64encode(raw).decode()
    settings = ServeSettings(run_dir=out, api_key="k", monitor_url=f"sqlite:///{tmp_path / 'log.sqlite'}",
                             options={"max_image_bytes": 30_000})
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(big, format="PNG")
    big = base64.b64encode(big.getvalue()).decode()
    huge = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(huge, format="PNG")
    huge = base64.b64encode(huge.getvalue()).decode()
    assert settings.max_chars < len(big) and len(huge) * 3 // 4 > 30_000 > len(big) * 3 // 4
    auth = {"Authorization": "Bearer k"}
    with TestClient(create_app(settings, run_predictor(out), reference=load_reference(out))) as c:
        r = c.post("/v1/predict", json={"images": [b64, "data:image/png;base64," + b64]}, headers=auth)
        assert r.status_code == 200
        a, b = r.json()["predictions"]
        assert a == b and set(a["probabilities"]) == set(COLOURS)
        files = [("image", ("a.png", raw, "image/png")), ("image", ("b.png", (data / "blue" / "2.png").read_bytes(), "image/png"))]
        m = c.post("/v1/predict", files=files, headers=auth)
        assert m.status_code == 200 and len(m.json()["predictions"]) == 2 and m.json()["predictions"][0] == a
        junk = c.post("/v1/predict", json={"images": [base64.b64encode(b"not a picture").decode()]}, headers=auth)
        assert junk.status_code == 422 and "image 0" in junk.json()["detail"] and "not an image" in junk.json()["detail"]
        # an image is bounded by its bytes (serve --max-image-bytes), not by a text's --max-chars
        assert c.post("/v1/predict", json={"images": [big]}, headers=auth).status_code == 200
        over = c.post("/v1/predict", json={"images": [b64, huge]}, headers=auth)
        assert over.status_code == 422 and "image 1" in over.json()["detail"] and "--max-image-bytes" in over.json()["detail"]
        notb64 = c.post("/v1/predict", json={"images": ["%%%"]}, headers=auth)
        assert notb64.status_code == 422 and "base64" in notb64.json()["detail"]
        texts = c.post("/v1/predict", json={"texts": ["hello"]}, headers=auth)
        assert texts.status_code == 422 and '{"images": ["..."]}' in texts.json()["detail"]
        monitor = c.get("/v1/monitor", headers=auth).json()
    assert monitor["status"] == "insufficient_data"
    reference = json.loads((out / "model" / "reference_profile.json").read_text())
    assert reference["length"]["edges"][2] == 64 ** 2  # drift bins image size in pixels, not characters
    import sqlite3

    rows = sqlite3.connect(tmp_path / "log.sqlite").execute("SELECT input_chars, measures FROM predictions").fetchall()
    assert {r[0] for r in rows} == {24 * 24, 96 * 96}  # pixels of each image served
    lit = json.loads(rows[0][1])["brightness"]
    assert abs(lit - 0.299 * 200 - 0.587 * 40 - 0.114 * 40) < 25  # a red square's luminance, bar and noise aside
    # the camera changes: overexposed, near-white photos of the same red things; brightness drifts, size does not
    washed = []
    for k in range(60):  # enough that the one 96x96 image above is no size drift
        buf = io.BytesIO()
        Image.fromarray(np.full((24, 24, 3), (255, 235 + k % 20, 235), np.uint8)).save(buf, format="PNG")
        washed.append(base64.b64encode(buf.getvalue()).decode())
    settings.drift_min_rows = 50
    with TestClient(create_app(settings, run_predictor(out), reference=load_reference(out))) as c:
        assert c.post("/v1/predict", json={"images": washed}, headers=auth).status_code == 200
        drift = c.get("/v1/monitor", headers=auth).json()
    assert drift["signals"]["brightness"]["drift"] and not drift["signals"]["length"]["drift"]


def _bad_run(capsys, data, tiny_vit_dir, out, *extra):
    code = main(["run", "--task", "image-classification", "--data", str(data), "--model", str(tiny_vit_dir),
                 "--output", str(out), "--epochs", "1", *extra])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", ["empty", "not_image", "truncated", "bomb", "empty_class"])
def test_bad_images_exit_2_naming_the_file(case, tmp_path, tiny_vit_dir, capsys):
    data = write_folder(tmp_path / "d", 6)
    if case == "empty":
        bad = data / "red" / "zero.png"
        bad.write_bytes(b"")
        want = "empty (0 bytes)"
    elif case == "not_image":
        bad = data / "green" / "notes.jpg"
        bad.write_text("this is not a picture")
        want = "not an image"
    elif case == "truncated":
        bad = data / "blue" / "cut.png"
        bad.write_bytes((data / "blue" / "0.png").read_bytes()[:120])
        want = "damaged or truncated"
    elif case == "bomb":
        bad = data / "red" / "huge.png"
        Image.new("L", (4000, 3000)).save(bad)
        want = "over the limit of"
        (tmp_path / "c.yaml").write_text(json.dumps(
            {"task": {"type": "image-classification", "max_pixels": 10_000_000}, "data": {"path": str(data)},
             "model": {"name": str(tiny_vit_dir)}, "output": {"dir": str(tmp_path / "out")}}))
        code = main(["run", str(tmp_path / "c.yaml")])
        err = capsys.readouterr().err
        assert code == 2 and str(bad) in err and want in err and "Traceback" not in err
        assert not (tmp_path / "out").exists()
        return
    else:
        bad = data / "yellow"
        bad.mkdir()
        want = "holds no images"
    code, err = _bad_run(capsys, data, tiny_vit_dir, tmp_path / "out")
    assert code == 2 and str(bad) in err and want in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_skip_bad_images_lists_them_and_trains_on_the_rest(tmp_path, tiny_vit_dir):
    from tuneforge.tasks.behaviour import get_task

    data = write_folder(tmp_path / "d", 8)
    (data / "red" / "zero.png").write_bytes(b"")
    (data / "blue" / "junk.png").write_text("junk")
    cfg = parse_config({"task": {"type": "image-classification"}, "data": {"path": str(data), "skip_bad_images": True},
                        "model": {"name": str(tiny_vit_dir)}, "output": {"dir": str(tmp_path / "o")}})
    prepared = get_task("image-classification").prepare(cfg)
    bad = [r for r in prepared.report["removed"] if r["reason"] == "bad_image"]
    assert sorted(r["detail"].split(":")[0] for r in bad) == ["blue/junk.png", "red/zero.png"]
    assert sum(len(ex) for _, ex in prepared.splits.items()) == 24


def test_a_table_of_paths_refuses_one_that_leaves_its_folder_or_is_missing(tmp_path, tiny_vit_dir, capsys):
    import pandas as pd

    data = write_folder(tmp_path / "imgs", 4)
    rows = [{"image": f"imgs/{lab}/{k}.png", "label": lab} for lab in COLOURS for k in range(4)]
    for extra, want in (({"image": "../secret.png", "label": "red"}, "leads outside"),
                        ({"image": "imgs/red/nope.png", "label": "red"}, "does not exist")):
        table = tmp_path / "labels.csv"
        pd.DataFrame(rows + [extra]).to_csv(table, index=False)
        (tmp_path / "secret.png").write_bytes((data / "red" / "0.png").read_bytes())
        code, err = _bad_run(capsys, table, tiny_vit_dir, tmp_path / "out")
        assert code == 2 and str(table) in err and "row 12" in err and want in err


def test_multi_label_images_from_a_table_learn_each_label_and_a_folder_is_refused(tmp_path, tiny_vit_dir, capsys):
    """Colour plus "bar" when the image has a bright bar: rows carry one or two labels (a|b cells and JSON lists)."""
    import pandas as pd

    rng = np.random.default_rng(3)
    (tmp_path / "imgs").mkdir()
    rows = []
    for k in range(72):
        colour, barred = list(COLOURS)[k % 3], k % 2 == 0
        arr = np.clip(np.array(COLOURS[colour], np.float32) + rng.normal(0, 20, (24, 24, 3)), 0, 255)
        if barred:
            arr[8:14, :, :] = 255
        Image.fromarray(arr.astype(np.uint8)).save(tmp_path / "imgs" / f"{k}.png")
        labels = [colour, "bar"] if barred else [colour]
        rows.append({"image": f"imgs/{k}.png", "label": json.dumps(labels) if k % 4 == 0 else "|".join(labels)})
    table = tmp_path / "labels.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    cfg = _config(table, tiny_vit_dir, tmp_path / "out", multi_label=True, augment=[])
    metrics = run(cfg)
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["labels"] == sorted([*COLOURS, "bar"]) and json.loads((tmp_path / "out" / "data_report.json").read_text())["multi_label"]
    assert set(saved["test"]["model"]["per_class"]) == set(saved["labels"])  # each label scored on its own
    assert saved["test"]["model"]["macro_f1"] == metrics["test"]["model"]["macro_f1"]
    assert saved["test"]["model"]["macro_f1"] > saved["test"]["baselines"]["majority"]["macro_f1"] + 0.5  # it learned
    from tuneforge.tasks.image_classification.predictor import ImagePredictor

    predictor = ImagePredictor.load(tmp_path / "out" / "model")
    assert predictor.space.multi_label and predictor.space.threshold == 0.5
    got = predictor.predict([tmp_path / "imgs" / "0.png", tmp_path / "imgs" / "1.png"])
    assert all(isinstance(g["label"], list) for g in got)  # the labels chosen, one list per image
    assert json.loads((tmp_path / "out" / "audit.json").read_text())["label_issues"]["skipped"] == "multi-label data"
    # a folder of class sub-folders cannot say that an image has two labels
    data = write_folder(tmp_path / "folders", 4)
    code = main(["run", "--task", "image-classification", "--data", str(data), "--model", str(tiny_vit_dir),
                 "--output", str(tmp_path / "o2"), "--multi-label"])
    err = capsys.readouterr().err
    assert code == 2 and "one label per image" in err and not (tmp_path / "o2").exists()


def test_given_split_folders_are_taken_as_given_and_copies_across_them_are_left_out_of_training(tmp_path, tiny_vit_dir):
    from tuneforge.tasks.behaviour import get_task

    root = tmp_path / "ds"
    write_folder(root / "train", 10, seed=1)
    write_folder(root / "validation", 3, seed=2)
    write_folder(root / "test", 3, seed=3)
    # a training image that is a re-encoded (JPEG) copy of a test image: a near duplicate by thumbnail similarity
    Image.open(root / "test" / "red" / "0.png").save(root / "train" / "red" / "copy.jpg", quality=85)
    cfg = parse_config({"task": {"type": "image-classification"}, "data": {"path": str(root)},
                        "model": {"name": str(tiny_vit_dir)}, "output": {"dir": str(tmp_path / "o")}})
    prepared = get_task("image-classification").prepare(cfg)
    assert [len(prepared.splits.val), len(prepared.splits.test)] == [9, 9]
    copies = [r for r in prepared.report["removed"] if r["reason"] == "held_out_copy"]
    assert len(copies) == 1 and "thumbnail similarity" in copies[0]["detail"] and copies[0]["matches"]["split"] == "test"
    assert "red/copy.jpg" not in prepared.splits.train.texts


def test_every_mode_becomes_rgb_and_exif_orientation_is_applied():
    from tuneforge.tasks.image_classification.images import open_rgb

    def encoded(img, fmt, **kw):
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        return buf.getvalue()

    rgb = Image.new("RGB", (6, 4), (10, 200, 30))
    for img, fmt in ((rgb.convert("L"), "PNG"), (rgb.convert("P"), "GIF"), (rgb.convert("CMYK"), "JPEG"),
                     (rgb.convert("RGBA"), "PNG"), (Image.new("I;16", (6, 4), 40000), "PNG"), (rgb, "WEBP"),
                     (rgb, "BMP"), (rgb, "TIFF")):
        out = open_rgb(encoded(img, fmt), 10**6)
        assert out.mode == "RGB" and out.size == (6, 4), (img.mode, fmt)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the camera held sideways
    turned = open_rgb(encoded(rgb, "JPEG", exif=exif.tobytes()), 10**6)
    assert turned.size == (4, 6)
    see_through = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    assert open_rgb(encoded(see_through, "PNG"), 10**6).getpixel((0, 0)) == (255, 255, 255)  # on white


def test_lora_on_a_vit_trains_the_adapters_and_the_new_head_only(tiny_vit_dir):
    import torch

    from tuneforge.config import TrainConfig
    from tuneforge.models.load import apply_method
    from tuneforge.tasks.behaviour import get_task
    from tuneforge.tasks.image_classification.task import ImageSpace

    task = get_task("image-classification")
    space = ImageSpace(("a", "b", "c"), False, 0.5, 32, augment=("flip",))
    model = apply_method(task.load_model(tiny_vit_dir, space, 0), TrainConfig(method="lora"), task.peft_task_type,
                         task.lora_targets(), task.lora_head())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)
    rng = np.random.default_rng(0)
    batch = task.collate([{"input_ids": rng.integers(0, 255, 32 * 32 * 3, dtype=np.uint8), "labels": np.int64(k % 3)}
                          for k in range(4)], 0)
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["labels"].tolist() == [0, 1, 2, 0]
    model(**batch).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n)


def test_the_default_efficientnet_lite0_loads_offline_at_the_working_size_and_freezes_its_lower_blocks(tmp_path, monkeypatch):
    import torch

    from tuneforge.config import TrainConfig
    from tuneforge.models.load import apply_method
    from tuneforge.tasks.behaviour import get_task
    from tuneforge.tasks.image_classification.model import LiteForImageClassification
    from tuneforge.tasks.image_classification.spec import DEFAULT_MODEL
    from tuneforge.tasks.image_classification.task import ImageSpace

    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    task = get_task("image-classification")
    model_dir, info = task.resolve_model(DEFAULT_MODEL)
    assert (model_dir / "model.safetensors").is_file() and info["cached"] is False
    assert task.resolve_model("efficientnet-lite0")[1]["cached"] is True
    space = ImageSpace(("x", "y"), False, 0.5, 64)
    model = task.load_model(model_dir, space, 0)
    logits = model(pixel_values=torch.zeros(2, 3, 64, 64)).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()  # the new head initialised, not left empty
    assert torch.equal(model.efficientnet._conv_head.weight, LiteForImageClassification.from_pretrained(
        str(model_dir)).efficientnet._conv_head.weight)  # the pre-trained weights kept
    model = apply_method(model, TrainConfig(method="frozen"), task.peft_task_type, task.lora_targets(), task.lora_head())
    frozen = {n.split(".")[2] for n, p in model.named_parameters() if not p.requires_grad and "_blocks" in n}
    assert frozen == {str(i) for i in range(8)}  # the lower half of 16 blocks, and the stem
    assert not model.efficientnet._conv_stem.weight.requires_grad and model.efficientnet._fc.weight.requires_grad
    assert "not plain transformers" in task.load_hint(model_dir)  # the run's last line says what loads it
    from tuneforge.tasks.image_classification.report import how_to_load

    assert "Plain transformers cannot load" in how_to_load(64, "pytorch") and "pipeline(" not in how_to_load(64, "pytorch")


def test_onnx_export_labels_every_test_image_alike_and_serves(image_run, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForImageClassification

    from tuneforge.serving.app import ServeSettings, create_app, run_predictor
    from tuneforge.serving.monitor import load_reference

    out, metrics, data = image_run
    assert main(["export", str(out), "--format", "onnx", "--quantize", "int8"]) == 0
    record = json.loads((out / "run.json").read_text())["exports"]["onnx"]
    test_rows = json.loads((out / "data_report.json").read_text())["splits"]["test"]["rows"]
    assert record["check"]["passed"] and record["check"]["rows"] == test_rows and record["check"]["label_agreement"] == 1.0
    assert record["int8"]["rows"] == test_rows
    assert record["inputs"] == {"pixel_values": ["batch", 3, 32, 32]}
    x = torch.randn(5, 3, 32, 32)  # a batch of 5: the export saw 2
    session = ort.InferenceSession(str(out / "export" / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"pixel_values": x.numpy()})
    with torch.no_grad():
        want = AutoModelForImageClassification.from_pretrained(out / "model").eval()(pixel_values=x).logits
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4)
    image = next(p for p in sorted(data.rglob("*.png")))
    encoded = base64.b64encode(image.read_bytes()).decode()
    labels = {}
    for runtime in ("torch", "onnx"):
        settings = ServeSettings(run_dir=out, api_key="k", monitor_url=f"sqlite:///{tmp_path / f'{runtime}.sqlite'}")
        with TestClient(create_app(settings, run_predictor(out, runtime=runtime), reference=load_reference(out))) as c:
            r = c.post("/v1/predict", json={"images": [encoded]}, headers={"Authorization": "Bearer k"})
        assert r.status_code == 200, r.text
        labels[runtime] = r.json()["predictions"]
    assert labels["onnx"][0]["label"] == labels["torch"][0]["label"]
    for k, v in labels["torch"][0]["probabilities"].items():
        assert labels["onnx"][0]["probabilities"][k] == pytest.approx(v, abs=1e-4)
