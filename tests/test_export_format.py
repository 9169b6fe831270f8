"""The export folder's one writer and reader: atomic files, mimkit.json <-> ViTConfig, pixel_norm, shard hash."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mimkit.checkpoint.export_format import (META_FILE, WEIGHTS_FILE, architecture_of, encoder_meta, is_export,
                                             pixel_norm, read_export_meta, read_pixel_norm, shard_list_hash,
                                             vit_config_from_export, write_atomic, write_export)
from mimkit.models.vit import preset


def test_write_export_round_trips_and_leaves_no_temporary_files(tmp_path):
    vit = preset("vit_tiny_cpu", rel_pos="block")
    meta = encoder_meta(vit, pixel_norm([0.5] * 3, [0.25] * 3, 32, "bicubic"), method="mae", tokenizer=None,
                        teacher=None)
    weights = {"w": torch.arange(6.0).view(2, 3).t()}  # not contiguous: the writer makes it so
    out = write_export(tmp_path / "export", weights, meta)
    assert sorted(p.name for p in out.iterdir()) == sorted([WEIGHTS_FILE, META_FILE]) and is_export(out)
    assert torch.equal(load_file(str(out / WEIGHTS_FILE))["w"], weights["w"])
    back = read_export_meta(out)
    assert back["format"] == "mimkit-export" and back["version"] == 1 and back["method"] == "mae"
    assert vit_config_from_export(back) == vit and back["architecture"] == architecture_of(vit)
    assert vit_config_from_export(back, num_classes=5).num_classes == 5
    with pytest.raises(ValueError, match="not_a_field"):
        vit_config_from_export(back, not_a_field=1)


def test_missing_meta_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        read_export_meta(tmp_path / "nowhere")
    assert not is_export(tmp_path)


def test_write_atomic_text_bytes_and_writer(tmp_path):
    write_atomic(tmp_path / "a", "text")
    write_atomic(tmp_path / "b", b"\x00\x01")
    write_atomic(tmp_path / "c", lambda tmp: tmp.write_text(json.dumps({"k": 1})))
    assert (tmp_path / "a").read_text() == "text" and (tmp_path / "b").read_bytes() == b"\x00\x01"
    assert json.loads((tmp_path / "c").read_text()) == {"k": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


def test_pixel_norm_gaps_are_filled():
    norm = read_pixel_norm({"pixel_norm": {"mean": None, "std": None, "image_size": None}}, 48)
    assert norm["mean"] == [0.485, 0.456, 0.406] and norm["image_size"] == 48 and norm["interpolation"] is None


def test_shard_list_hash_sees_names_and_sizes(tmp_path):
    for name, size in (("a-000000.tar", 3), ("a-000001.tar", 5)):
        (tmp_path / name).write_bytes(b"x" * size)
    spec = str(tmp_path / "a-{000000..000001}.tar")
    first = shard_list_hash(spec)
    assert first["of"] == "2 shard names and sizes"
    (tmp_path / "a-000001.tar").write_bytes(b"x" * 6)
    assert shard_list_hash(spec)["sha256"] != first["sha256"]
    assert shard_list_hash("")["sha256"] is None
    assert shard_list_hash(str(tmp_path / "gone-{0..1}.tar"))["of"].startswith("the data.shards spec")
