"""Bad data fails loudly, naming the JSON file and record; skip mode drops it and logs the count."""

import json
import logging

import pytest
import torch
from PIL import Image

from mflightning.data import CalibrationDataModule, DataRecordError, RetrievalDataModule, VQADataModule


@pytest.fixture
def root(tmp_path, tiny_world):
    """An image root with two good PNGs and one corrupt file."""
    images = tmp_path / "images"
    images.mkdir()
    for name, color in (("a.png", (255, 0, 0)), ("b.png", (0, 0, 255))):
        Image.new("RGB", (20, 20), color).save(images / name)
    (images / "broken.png").write_bytes(b"not an image")
    return images


def _write(tmp_path, records, name="data.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return str(path)


def _calibration(path, root, tiny_world, skip=False, batch_size=2):
    return CalibrationDataModule(path, str(root), tokenizer=tiny_world.vocab, image_size=16, batch_size=batch_size,
                                 num_workers=0, max_length=8, skip_bad_records=skip, augment=False)


GOOD = {"image": "a.png", "caption": "a red circle"}


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"image": "missing.png", "caption": "a red circle"}, r"record 1: image file not found: .*missing\.png"),
        ({"image": "b.png", "caption": "  . "}, "record 1: empty caption"),
        ({"image": "b.png"}, "record 1: missing key 'caption'"),
        ({"image": "b.png", "caption": 7}, "record 1: key 'caption' has type int, expected str"),
        ({"image": ["b.png"], "caption": "x"}, "record 1: key 'image' has type list, expected str"),
        ("b.png", "record 1: expected a JSON object, got str"),
    ],
)
def test_bad_calibration_record_names_file_and_index(tmp_path, root, tiny_world, bad, message):
    path = _write(tmp_path, [GOOD, bad, GOOD])
    dm = _calibration(path, root, tiny_world)
    with pytest.raises(DataRecordError, match="data.json: " + message):
        dm.setup("fit")


def test_skip_mode_drops_bad_records_and_logs_the_count(tmp_path, root, tiny_world, caplog):
    path = _write(tmp_path, [GOOD, {"image": "missing.png", "caption": "x"}, {"image": "b.png", "caption": ""},
                             {"image": "b.png", "caption": "a blue square"}])
    dm = _calibration(path, root, tiny_world, skip=True)
    with caplog.at_level(logging.WARNING, logger="mflightning.data"):
        dm.setup("fit")
    assert len(dm.dataset("calibration")) == 2
    (record,) = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert "data.json: skipped 2 of 4 bad records (first: record 1: image file not found" in record.getMessage()


def test_undecodable_image_names_image_and_record(tmp_path, root, tiny_world):
    path = _write(tmp_path, [GOOD, {"image": "broken.png", "caption": "a broken image"}])
    dm = _calibration(path, root, tiny_world)
    dm.setup("fit")  # the file exists, so the build-time check passes
    with pytest.raises(DataRecordError, match=r"data\.json: record 1: cannot decode image .*broken\.png"):
        list(dm.calibration_dataloader())


def test_skip_mode_drops_undecodable_images_at_load_time(tmp_path, root, tiny_world, caplog):
    path = _write(tmp_path, [GOOD, {"image": "broken.png", "caption": "a broken image"},
                             {"image": "b.png", "caption": "a blue square"}])
    dm = _calibration(path, root, tiny_world, skip=True, batch_size=3)
    with caplog.at_level(logging.WARNING, logger="mflightning.data"):
        (batch,) = list(dm.calibration_dataloader())
    assert batch["image"].shape[0] == 2 and batch["input_ids"].shape[0] == 2
    assert any("broken.png" in r.getMessage() and "record 1" in r.getMessage() for r in caplog.records)


def test_unreadable_json_file_is_named(tmp_path, root, tiny_world):
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    with pytest.raises(DataRecordError, match="broken.json: cannot read JSON"):
        _calibration(str(broken), root, tiny_world).setup("fit")
    with pytest.raises(DataRecordError, match="nowhere.json: file not found"):
        _calibration(str(tmp_path / "nowhere.json"), root, tiny_world).setup("fit")
    with pytest.raises(DataRecordError, match="dict.json: expected a JSON list"):
        _calibration(_write(tmp_path, {"image": "a.png"}, "dict.json"), root, tiny_world).setup("fit")


def test_karpathy_eval_record_checks(tmp_path, root, tiny_world):
    common = dict(image_root=str(root), tokenizer=tiny_world.vocab, image_size=16, num_workers=0)
    for bad, message in (
        ({"image": "b.png", "caption": []}, "record 1: empty caption list"),
        ({"image": "b.png", "caption": ["ok", ""]}, r"record 1: empty caption \(caption 1\)"),
        ({"image": "b.png", "caption": "one string"}, "record 1: key 'caption' has type str, expected list"),
        ({"image": "a.png", "caption": ["again"]}, "record 1: image_id 'a' already used by record 0"),
    ):
        path = _write(tmp_path, [{"image": "a.png", "caption": ["a red square"]}, bad], "val.json")
        with pytest.raises(DataRecordError, match="val.json: " + message):
            RetrievalDataModule(val_json=path, **common).setup("validate")


def test_vqa_record_checks(tmp_path, root, tiny_world):
    common = dict(image_root=str(root), tokenizer=tiny_world.vocab, image_size=16, num_workers=0)
    good = {"question_id": 1, "image": "a.png", "question": "what color?", "answer": ["red"] * 10}
    cases = [
        ("train", {**good, "answer": []}, "record 1: empty answer list"),
        ("train", {**good, "answer": ["red", 3]}, "record 1: answer 1 has type int, expected str"),
        ("train", {**good, "dataset": "coco"}, "record 1: key 'dataset' is 'coco', expected 'vqa' or 'vg'"),
        ("train", {k: v for k, v in good.items() if k != "question"}, "record 1: missing key 'question'"),
        ("test", {k: v for k, v in good.items() if k != "question_id"}, "record 1: missing key 'question_id'"),
        ("test", {**good, "question_id": "7"}, "record 1: key 'question_id' has type str, expected int"),
        ("test", {**good, "question_id": True}, "record 1: key 'question_id' has type bool, expected int"),
        ("test", {k: v for k, v in good.items() if k != "answer"}, "record 1: has no 'answer' while other"),
    ]
    for split, bad, message in cases:
        path = _write(tmp_path, [good, bad], f"{split}.json")
        dm = VQADataModule(train_json=path if split == "train" else None,
                           test_json=path if split == "test" else None, **common)
        with pytest.raises(DataRecordError, match=f"{split}.json: " + message):
            dm.setup(None)


def test_answer_list_is_checked(tmp_path, root, tiny_world):
    path = _write(tmp_path, ["yes", "", "no"], "answers.json")
    dm = VQADataModule(answer_list_json=path, image_root=str(root), tokenizer=tiny_world.vocab)
    with pytest.raises(DataRecordError, match="answers.json: record 1"):
        dm.answer_list


def test_good_records_still_load(tmp_path, root, tiny_world):
    path = _write(tmp_path, [GOOD, {"image": "b.png", "caption": "a blue square"}])
    (batch,) = list(_calibration(path, root, tiny_world).calibration_dataloader())
    assert batch["image"].shape == (2, 3, 16, 16) and torch.isfinite(batch["image"]).all()


def test_eval_image_id_defaults_to_coco_number_or_file_stem(tmp_path, root, tiny_world):
    coco = root / "val2014"
    coco.mkdir()
    Image.new("RGB", (8, 8)).save(coco / "COCO_val2014_000000391895.jpg")
    records = [{"image": "val2014/COCO_val2014_000000391895.jpg", "caption": ["a red square"]},
               {"image": str(root / "b.png"), "caption": ["an absolute path"]},  # absolute paths are kept
               {"image": "a.png", "caption": ["given id"], "image_id": 42}]
    path = _write(tmp_path, records, "test.json")
    from mflightning.data import CaptionDataModule

    dm = CaptionDataModule(test_json=path, image_root=str(root), tokenizer=tiny_world.vocab, image_size=16,
                           batch_size=4, num_workers=0)
    (batch,) = list(dm.test_dataloader())
    assert batch["image_id"] == ["391895", "b", "42"]
