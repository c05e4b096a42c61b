"""Export to ONNX, its parity with PyTorch, and prediction from the file alone (no torch)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

import transferlab as tl
from transferlab import backbones, cli, feeds, images
from transferlab.config import TrainConfig
from transferlab.export import TOLERANCE, export
from transferlab.exported import ExportedModel
from transferlab.model import create_classifier
from transferlab.predict import probabilities

from .conftest import SHARED, TINY, make_folder


def onnx_files(run: tl.Run) -> tuple[Path, Path]:
    return run.path / "model.onnx", run.path / "model.int8.onnx"


def predicted(capsys, *args: str) -> list[dict]:
    assert cli.main(["predict", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_export_is_the_runs_model_with_a_dynamic_batch_and_its_metadata(deployed):
    fp32, _ = onnx_files(deployed)
    proto = onnx.load(str(fp32))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    (given,) = proto.graph.input
    assert given.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert given.type.tensor_type.shape.dim[0].dim_param  # symbolic: any batch size
    model = ExportedModel(fp32)
    assert model.classes == deployed.classes and model.preprocessing == deployed.preprocessing
    assert model.card["backbone"] == "mobilenetv2_100" and model.card["strategy"] == "partial"
    assert model.card["validation"]["accuracy"] == deployed.metrics["accuracy"]
    size = deployed.preprocessing.size
    for batch in (1, 5):
        x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = probabilities(deployed.model(x.to(next(deployed.model.parameters()).device))).cpu().numpy()
        got = model.probabilities(x.numpy())
        assert got.shape == (batch, 2)
        assert np.abs(got - expected).max() <= TOLERANCE
        assert (got.argmax(1) == expected.argmax(1)).all()


def test_predict_from_the_onnx_file_answers_as_the_run_does(deployed, capsys, tmp_path):
    folder = Path(deployed.config.data)
    (tmp_path / "notes.jpg").write_text("not an image")
    from_run = predicted(capsys, str(deployed.path), str(folder), str(tmp_path / "notes.jpg"))
    from_file = predicted(capsys, str(onnx_files(deployed)[0]), str(folder), str(tmp_path / "notes.jpg"))
    assert [r["path"] for r in from_file] == [r["path"] for r in from_run] and len(from_run) == 25
    assert [r.get("label") for r in from_file] == [r.get("label") for r in from_run]
    assert from_file[-1]["error"] == from_run[-1]["error"] == "cannot decode: unknown image format or broken header"
    differences = [abs(a["probability"] - b["probability"]) for a, b in zip(from_file, from_run) if "label" in a]
    assert max(differences) < 0.01  # the pixels differ by a rounding step at most (see the next test)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_prepare_reproduces_the_torchvision_pipeline_within_two_levels(interpolation, tmp_path):
    """Pillow's resampling against torchvision's: sizes that shrink, grow, keep the short side, odd and portrait
    ones, and a crop larger than the resized image (zero padding)."""
    rng = np.random.default_rng(0)
    pre = images.Preprocessing(48, 55, interpolation, (0.5,) * 3, (0.5,) * 3)
    smooth = [(Image.fromarray(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)).resize((w, h)), pre)
              for w, h in ((500, 375), (375, 500), (55, 80), (33, 41), (131, 97))]
    padded = (smooth[0][0], images.Preprocessing(48, 40, interpolation, (0.5,) * 3, (0.5,) * 3))
    for im, p in [*smooth, padded]:
        expected = feeds.transforms(p)(im).numpy().astype(int)
        got = images.prepare(im, p).astype(int)
        assert got.shape == expected.shape == (3, 48, 48)
        assert np.abs(got - expected).max() <= 2 and (got != expected).mean() < 0.02, (im.size, p)


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs the shared cats-vs-dogs photos")
def test_prepare_reproduces_the_torchvision_pipeline_on_real_photos():
    photos = sorted((SHARED / "validation").rglob("*.jpg"))[::40]
    for name in ("tf_efficientnet_lite0", "resnet50", "vgg16"):
        pre = backbones.preprocessing(backbones.create(name, 32)[0].pretrained_cfg)
        for f in photos:
            im = images.load_image(f, draft=pre.resize)
            difference = np.abs(images.prepare(im, pre).astype(int) - feeds.transforms(pre)(im).numpy())
            assert difference.max() <= 2 and (difference > 0).mean() < 0.01, (name, f)


def test_predicting_from_an_onnx_file_imports_no_torch(deployed, tmp_path):
    """As on a machine with only onnxruntime, numpy and pillow: the training stack cannot even be imported."""
    image = next(Path(deployed.config.data).rglob("*.jpg"))
    script = f"""
import json, sys
class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {{"torch", "torchvision", "timm", "sklearn", "matplotlib", "onnx", "safetensors"}}:
            raise ImportError("not installed here: " + name)
sys.meta_path.insert(0, Absent())
from transferlab import cli
code = cli.main(["predict", {str(onnx_files(deployed)[0])!r}, {str(image)!r}, "--json"])
assert code == 0 and "torch" not in sys.modules, (code, sorted(sys.modules))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(done.stdout)
    assert row["path"] == str(image) and row["label"] in deployed.classes


def test_int8_copy_carries_the_metadata_and_its_accuracy_is_printed(exported):
    run, printed = exported
    fp32, int8 = onnx_files(run)
    model = ExportedModel(int8)
    assert model.classes == run.classes
    assert model.card["quantization"] == "int8, static, calibrated on 19 training images"
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(int8)).graph.node)
    lines = printed.splitlines()
    assert lines[0].startswith(f"wrote {fp32} (") and "ONNX Runtime gives PyTorch's probabilities within" in lines[0]
    assert lines[1].startswith(f"wrote {int8} (") and lines[1].endswith("int8, calibrated on 19 training images")
    assert lines[2].startswith("validation accuracy on 5 images: int8 ") and len(lines) == 3


def test_export_refuses_what_it_should_in_one_line(deployed, tmp_path, capsys, monkeypatch):
    photo = tmp_path / "photo.onnx"
    photo.write_bytes(b"the user's own file")
    for argv, message in [
        ([str(deployed.path)], "model.onnx already exists; pass --overwrite to replace it"),
        ([str(deployed.path), "--out", str(photo), "--overwrite"], "is not an ONNX file that transferlab exported"),
        ([str(deployed.path), "--out", str(tmp_path / "a.onnx"), "--quantize", "int4"],
         "--quantize must be one of int8"),
        ([str(tmp_path)], "is not a readable transferlab run"),
    ]:
        assert cli.main(["export", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert photo.read_bytes() == b"the user's own file"

    def unsupported(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::weird' to ONNX opset version 18 is not supported.\nmore")

    monkeypatch.setattr(torch.onnx, "export", unsupported)
    assert cli.main(["export", str(deployed.path), "--out", str(tmp_path / "b.onnx")]) == 2
    assert capsys.readouterr().err == ("transferlab: error: cannot export backbone mobilenetv2_100 to ONNX: Exporting "
                                       "the operator 'aten::weird' to ONNX opset version 18 is not supported.\n")
    assert not (tmp_path / "b.onnx").exists()


def test_int8_needs_the_training_images(tmp_path, tiny):
    folder = make_folder(tmp_path / "data", per_class=4)
    run = tl.train(folder, val=str(make_folder(tmp_path / "val", per_class=2)), out=tmp_path / "run",
                   strategy="feature-extraction", **tiny | {"epochs": 1})
    for f in folder.rglob("*.*"):
        f.unlink()
    with pytest.raises(tl.TransferlabError, match="cannot calibrate int8: the run's training images are gone"):
        export(run.path, quantize="int8")
    assert not (tmp_path / "run" / "model.onnx").exists()


def test_an_onnx_file_that_transferlab_did_not_write_is_one_line(tmp_path, capsys):
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "other",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph), str(tmp_path / "other.onnx"))
    (tmp_path / "broken.onnx").write_bytes(b"\x08\x07")
    for name, message in [("other.onnx", "was not exported by transferlab, so its classes and preprocessing are "
                                         "unknown"),
                          ("broken.onnx", "is not a readable ONNX model"), ("missing.onnx", "model file not found")]:
        assert cli.main(["predict", str(tmp_path / name), str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("backbone", backbones.LISTED)
def test_every_listed_backbone_exports(backbone, tmp_path):
    """Untrained (the export does not care), so that eight backbones cost seconds each."""
    config = TrainConfig(data="unused", **TINY | {"backbone": backbone})
    built = create_classifier(config, 3, fold_bn=True)
    info = {"classes": ["a", "b", "c"], "preprocessing": asdict(built.pre), "backbone": {"weights": "none"}}
    run = tl.Run(config, info, built.model.eval(), [], {}, [], tmp_path)
    assert export(run).max_difference <= TOLERANCE
    assert ExportedModel(tmp_path / "model.onnx").classes == ["a", "b", "c"]
