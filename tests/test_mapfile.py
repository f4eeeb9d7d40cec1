"""Placement files: vllm-ascend and SGLang expert maps <-> phy2log."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from eplbctl.mapfile import (
    MapFileError,
    diff_maps,
    placement_to_ascend,
    placement_to_sglang,
    read_map,
    write_map,
)
from eplbctl.placement import contiguous_placement


def placement() -> np.ndarray:
    """2 layers, 4 experts, 3 devices x 2 slots."""
    return np.array([[[0, 1], [2, 3], [0, 2]],
                     [[3, 2], [1, 0], [1, 3]]], dtype=np.int64)


def write(tmp_path: Path, doc: object, name: str = "m.json") -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


@pytest.mark.parametrize("fmt", ["ascend", "sglang"])
def test_round_trip(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / "m.json"
    write_map(path, placement(), fmt)
    back = read_map(path, num_devices=3)
    assert back.dtype == np.int64
    assert np.array_equal(back, placement())
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]  # no temporary left behind


def test_round_trip_real_size(tmp_path: Path) -> None:
    big = contiguous_placement(58, 256, 32, 9)
    for fmt in ("ascend", "sglang"):
        write_map(tmp_path / f"{fmt}.json", big, fmt)
        assert np.array_equal(read_map(tmp_path / f"{fmt}.json", num_devices=32, num_experts=256), big)


def test_ascend_layout() -> None:
    doc = placement_to_ascend(placement())
    assert doc["moe_layer_count"] == 2
    assert doc["layer_list"][1] == {"layer_id": 1, "device_count": 3, "device_list": [
        {"device_id": 0, "device_expert": [3, 2]}, {"device_id": 1, "device_expert": [1, 0]},
        {"device_id": 2, "device_expert": [1, 3]}]}


def test_sglang_layout_is_device_major() -> None:
    assert placement_to_sglang(placement())["physical_to_logical_map"][0] == [0, 1, 2, 3, 0, 2]


def test_ascend_devices_and_layers_ordered_by_id(tmp_path: Path) -> None:
    doc = placement_to_ascend(placement())
    doc["layer_list"].reverse()
    doc["layer_list"][0]["device_list"].reverse()
    assert np.array_equal(read_map(write(tmp_path, doc)), placement())


def ascend_with(change: Callable[[dict[str, Any]], object]) -> dict[str, Any]:
    doc = placement_to_ascend(placement())
    change(doc)
    return doc


def drop_last_device_of_layer_1(doc: dict[str, Any]) -> None:
    doc["layer_list"][1]["device_list"].pop()
    doc["layer_list"][1]["device_count"] = 2


@pytest.mark.parametrize(("doc", "message"), [
    (ascend_with(lambda d: d["layer_list"][0]["device_list"][2].update(device_expert=[3, 3])),
     "m.json: layer 0 device 2: expert 3 has two replicas on one device (slots [0, 1])"),
    (ascend_with(lambda d: d["layer_list"][1]["device_list"][0].update(device_expert=[3, 9])),
     "m.json: layer 1 device 0 slot 1: expert id 9 out of range [0, 4)"),
    (ascend_with(lambda d: d.update(moe_layer_count=3)),
     "m.json: moe_layer_count says 3 but layer_list has 2 layers"),
    (ascend_with(lambda d: d["layer_list"][1].update(device_count=4)),
     "m.json: layer 1 device_count says 4 but device_list has 3 devices"),
    (ascend_with(lambda d: d["layer_list"][1]["device_list"][1].update(device_expert=[1])),
     "m.json: layer 1 device 1 has 1 experts, expected 2"),
    (ascend_with(drop_last_device_of_layer_1),
     "m.json: layer 1 has 2 devices, expected 3"),
    (ascend_with(lambda d: d["layer_list"][0]["device_list"][1].update(device_id=5)),
     "m.json: layer 0 device ids [0, 2, 5] are not 0..2"),
    (ascend_with(lambda d: d["layer_list"][1].update(layer_id=0)), "m.json: layer_id 0 appears twice"),
    (ascend_with(lambda d: d["layer_list"][0]["device_list"][0].update(device_expert=[0, "1"])),
     "m.json: layer 0 device 0 device_expert: expected an integer, got '1'"),
    ({"layer_list": []}, "m.json: layer_list is empty"),
    ({"foo": 1}, "m.json: unknown map format"),
    ("{not json", "m.json: not valid JSON"),
])
def test_bad_ascend_maps_rejected(tmp_path: Path, doc: object, message: str) -> None:
    with pytest.raises(MapFileError) as info:
        read_map(write(tmp_path, doc), num_experts=4)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_expert_rejected_when_expert_count_given(tmp_path: Path) -> None:
    doc = placement_to_ascend(placement())
    with pytest.raises(MapFileError, match=r"m\.json: layer 0: expert 4 has no slot"):
        read_map(write(tmp_path, doc), num_experts=5)
    with pytest.raises(MapFileError, match=r"m\.json: map has 3 devices, expected 4"):
        read_map(write(tmp_path, doc), num_devices=4)


@pytest.mark.parametrize(("doc", "devices", "message"), [
    (placement_to_sglang(placement()), None,
     "m.json: an SGLang physical_to_logical_map needs the device count"),
    (placement_to_sglang(placement()), 4, "m.json: 6 physical slots do not divide over 4 devices"),
    ({"physical_to_logical_map": [[1, 2, 0, 0]]}, 2,
     "m.json: layer 0 device 1: expert 0 has two replicas on one device (slots [0, 1])"),
    ({"physical_to_logical_map": [[0, 1, 2, 3], [0, 1, 2]]}, 2,
     "m.json: physical_to_logical_map layer 1 has 3 slots, expected 4 like layer 0"),
    ({"physical_to_logical_map": []}, 2, "m.json: physical_to_logical_map is empty"),
    ({"physical_to_logical_map": [[0, 1.5]]}, 2, "expected an integer, got 1.5"),
])
def test_bad_sglang_maps_rejected(tmp_path: Path, doc: object, devices: int | None, message: str) -> None:
    with pytest.raises(MapFileError) as info:
        read_map(write(tmp_path, doc), num_devices=devices)
    assert message in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MapFileError, match=r"nope\.json: no such file"):
        read_map(tmp_path / "nope.json")


def test_write_rejects_bad_placement_and_format(tmp_path: Path) -> None:
    bad = placement()
    bad[0, 0] = [1, 1]
    with pytest.raises(MapFileError, match=r"out\.json: layer 0 device 0: expert 1 has two replicas"):
        write_map(tmp_path / "out.json", bad)
    with pytest.raises(MapFileError, match="unknown map format 'yaml'"):
        write_map(tmp_path / "out.json", placement(), "yaml")
    with pytest.raises(MapFileError, match="must be a non-empty"):
        write_map(tmp_path / "out.json", np.zeros((2, 3), dtype=np.int64))
    assert list(tmp_path.iterdir()) == []


def test_diff_maps_counts_moves_per_layer() -> None:
    old = placement()
    new = old.copy()
    new[0, 0] = [1, 0]  # a swap on one device moves nothing
    new[1, 2] = [0, 3]  # device 2 of layer 1 gets expert 0: one move
    assert diff_maps(old, new).tolist() == [0, 1]
    assert diff_maps(old, old).tolist() == [0, 0]
    with pytest.raises(MapFileError, match="maps differ in shape"):
        diff_maps(old, old[:1])


def test_writing_through_a_symlink_updates_its_target_and_keeps_the_link(tmp_path: Path) -> None:
    target = tmp_path / "target.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    write_map(link, placement())
    assert link.is_symlink()
    assert np.array_equal(read_map(target, num_devices=3), placement())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "target.json"]


def test_writing_to_a_fifo_feeds_its_reader_instead_of_replacing_it(tmp_path: Path) -> None:
    import os
    import threading

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()), daemon=True)
    reader.start()
    write_map(fifo, placement(), "sglang")
    reader.join(timeout=10)
    assert fifo.exists() and not fifo.is_file()  # still a FIFO
    assert json.loads(got[0])["physical_to_logical_map"] == placement().reshape(2, -1).tolist()


def test_writing_to_a_directory_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(MapFileError, match="is a directory"):
        write_map(tmp_path, placement())


def test_ascend_layer_ids_must_be_the_moe_indices(tmp_path: Path) -> None:
    doc = placement_to_ascend(placement())
    doc["layer_list"][1]["layer_id"] = 9
    with pytest.raises(MapFileError, match=r"layer ids \[0, 9\] are not 0..1"):
        read_map(write(tmp_path, doc))


@pytest.mark.parametrize("fmt", ["ascend", "sglang"])
def test_an_id_too_large_for_int64_is_bad_data_not_an_overflow(tmp_path: Path, fmt: str) -> None:
    doc = placement_to_ascend(placement()) if fmt == "ascend" else placement_to_sglang(placement())
    if fmt == "ascend":
        doc["layer_list"][0]["device_list"][0]["device_expert"][0] = 10**30
    else:
        doc["physical_to_logical_map"][0][0] = 10**30
    with pytest.raises(MapFileError, match="out of range"):
        read_map(write(tmp_path, doc), num_devices=3)


def test_replacing_a_map_keeps_its_mode(tmp_path: Path) -> None:
    import os

    path = tmp_path / "private.json"
    path.write_text("old")
    path.chmod(0o600)
    write_map(path, placement())
    assert (path.stat().st_mode & 0o777) == 0o600
    assert np.array_equal(read_map(path, num_devices=3), placement())
    if os.geteuid() != 0:  # root may write a read-only file, as a shell's `>` would
        path.chmod(0o444)
        with pytest.raises(MapFileError, match="Permission denied"):
            write_map(path, placement())


def test_a_symlink_loop_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(MapFileError, match="cannot write"):
        write_map(tmp_path / "a", placement())
