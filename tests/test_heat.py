"""Heat files: every real file, the invariants, the formats, and one-line rejections."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from eplbctl.heat import (
    HeatData,
    HeatError,
    default_heat_path,
    load_heat,
    save_compact,
    validate_heat,
)
from eplbctl.routes import routes_to_episodes

DEEPSEEK = ["decode_in1000out1000", "decode_in1800out100", "decode_in2000out100", "prefill_in1000out1000",
            "prefill_in1024", "prefill_in1800out100", "prefill_in2048", "prefill_in4096",
            "prefill_in500out1500", "prefill_in512"]
# These three mix prefill and decode traffic; their layer sums differ by < 0.01 %, so the README's
# "every MoE layer's row sums to the same value" holds for them only approximately.
APPROX_SUMS = {"prefill_in1000out1000", "prefill_in1800out100", "prefill_in500out1500"}
ROUTES = "routes/qwen1.5_moe_a2.7b/moe_routes.jsonl"


def write(tmp_path: Path, name: str, content: object) -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


# ----------------------------------------------------------------------------- real files


@pytest.mark.parametrize("name", DEEPSEEK)
def test_deepseek_files_load_with_dense_layers_dropped(shared_data: Path, name: str) -> None:
    data = load_heat(shared_data / "heat" / "deepseek_v3" / f"{name}.json")
    assert data.heat.shape == (58, 256)
    assert data.layer_ids == list(range(3, 61))
    assert data.heat.dtype == np.float64
    assert any("dropped 3 leading all-zero layers as dense (model layers 0-2)" in n for n in data.notes)
    sums = data.heat.sum(axis=1)
    if name in APPROX_SUMS:
        assert np.allclose(sums, sums[0], rtol=1e-3)
    else:
        assert (sums == sums[0]).all()
    assert (sums % 8 == 0).all()  # tokens x top-8
    skew = data.heat.max(axis=1) / data.heat.mean(axis=1)
    assert 5 <= skew.max() <= 14


@pytest.mark.parametrize(("name", "shape"), [("qwen3_235b_a22b", (94, 128)), ("qwen2_57b_a14b", (28, 64))])
def test_qwen_files_load(shared_data: Path, name: str, shape: tuple[int, int]) -> None:
    data = load_heat(shared_data / "heat" / "qwen" / f"{name}.json")
    assert data.heat.shape == shape
    assert data.layer_ids == list(range(shape[0]))
    sums = data.heat.sum(axis=1)
    assert (sums == sums[0]).all()


def test_qwen3_keeps_never_routed_experts_as_zeros(shared_data: Path) -> None:
    data = load_heat(shared_data / "heat" / "qwen" / "qwen3_235b_a22b.json")
    assert (data.heat == 0).sum() > 0


def test_routes_warmup_passes_dropped(shared_data: Path) -> None:
    path = shared_data / ROUTES
    data = load_heat(path)
    assert data.heat.shape == (1, 60)
    assert data.layer_ids == [0]
    kept = 18818 - 16384
    assert data.heat.sum() == kept * 4  # top-4
    assert data.heat.max() / data.heat.mean() == pytest.approx(1.48, abs=0.05)
    assert any("dropped 16384 rows in 2 warm-up passes" in n and "kept 2434 rows" in n for n in data.notes)
    # Counted naively (warm-up included) the hottest expert is ~13x the mean.
    ids = [json.loads(line)["topk_ids"] for line in path.read_text().splitlines()[1:]]
    naive = np.bincount(np.ravel(ids), minlength=60)
    assert naive.max() / naive.mean() > 12


def test_routes_to_episodes_time_series(shared_data: Path) -> None:
    data = routes_to_episodes(shared_data / ROUTES, 256)
    assert data.heat.shape == (2434 // 256, 1, 60)
    assert (data.heat.sum(axis=2) == 256 * 4).all()
    assert data.total().shape == (1, 60)
    assert data.is_series and data.num_layers == 1 and data.num_experts == 60


def test_load_heat_does_not_import_torch(shared_data: Path) -> None:
    code = ("import sys; from eplbctl.heat import load_heat; "
            f"load_heat({str(shared_data / 'heat/qwen/qwen2_57b_a14b.json')!r}); "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- validation


def test_zero_rows_are_valid() -> None:
    assert validate_heat([[0, 0], [1, 2]], "x").tolist() == [[0.0, 0.0], [1.0, 2.0]]


@pytest.mark.parametrize(("arr", "message"), [
    ([[1.0, float("nan")], [1.0, 2.0]], "f.json: logical_count: NaN at layer 0 expert 1"),
    ([[1.0, 2.0], [float("inf"), 2.0]], "f.json: logical_count: infinite value at layer 1 expert 0"),
    ([[1.0, 2.0], [3.0, -4.0]], "f.json: logical_count: negative count -4 at layer 1 expert 1"),
    ([[[1.0, 2.0]], [[1.0, -2.0]]], "f.json: logical_count: negative count -2 at step 1 layer 0 expert 1"),
    ([[1, 2, 3], [1, 2], [1, 2, 3]], "f.json: logical_count: layer 1 has 2 values, expected 3"),
    ([[[1, 2]], [[1, 2], [3, 4]]], "f.json: logical_count: step 1 has 2 entries, expected 1"),
    ([[1, "a"]], "f.json: logical_count: values must be numbers"),
    ([1.0, 2.0], "logical_count: heat must be [layers, experts] or [steps, layers, experts], got shape (2,)"),
    ([[]], "f.json: logical_count: heat is empty"),
    ([], "heat must be [layers, experts]"),
])
def test_bad_heat_rejected_with_one_line_message(arr: object, message: str) -> None:
    with pytest.raises(HeatError) as info:
        validate_heat(arr, "f.json: logical_count")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_nan_in_file_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.json", '{"logical_count": [[1, NaN], [1, 2]]}')
    with pytest.raises(HeatError, match=r"bad.json: logical_count: NaN at layer 0 expert 1"):
        load_heat(path)


# ----------------------------------------------------------------------------- formats


def test_sglang_dense_rows_dropped_but_middle_zero_row_kept(tmp_path: Path) -> None:
    path = write(tmp_path, "h.json", {"logical_count": [[0, 0], [0, 0], [3, 1], [0, 0], [2, 2]]})
    data = load_heat(path)
    assert data.layer_ids == [2, 3, 4]
    assert data.heat.tolist() == [[3, 1], [0, 0], [2, 2]]
    assert data.notes == ["dropped 2 leading all-zero layers as dense (model layers 0-1); "
                          "3 MoE layers remain"]


def test_all_zero_file_keeps_every_layer(tmp_path: Path) -> None:
    data = load_heat(write(tmp_path, "z.json", {"logical_count": [[0, 0], [0, 0]]}))
    assert data.heat.shape == (2, 2) and data.notes == []


def test_sglang_time_series_json(tmp_path: Path) -> None:
    data = load_heat(write(tmp_path, "t.json", {"logical_count": [[[0, 0], [1, 2]], [[0, 0], [3, 4]]]}))
    assert data.heat.shape == (2, 1, 2)
    assert data.layer_ids == [1]
    assert data.total().tolist() == [[4, 6]]


def test_qwen_declared_sizes_checked(tmp_path: Path) -> None:
    ok = {"counts": [[1, 2, 3], [3, 2, 1]], "num_layers": 2, "num_experts": 3, "src": "x.pt"}
    assert load_heat(write(tmp_path, "q.json", ok)).heat.shape == (2, 3)
    with pytest.raises(HeatError, match=r"q2.json: counts has 2 rows but num_layers says 3$"):
        load_heat(write(tmp_path, "q2.json", {**ok, "num_layers": 3}))
    with pytest.raises(HeatError, match=r"q3.json: counts has 3 columns but num_experts says 4$"):
        load_heat(write(tmp_path, "q3.json", {**ok, "num_experts": 4}))


def test_step_jsonl_per_layer_lines(tmp_path: Path) -> None:
    lines = [{"step": 1, "layer": 3, "counts": [1, 2]}, {"step": 0, "layer": 3, "counts": [5, 6]},
             {"step": 0, "layer": 4, "counts": [7, 8]}, {"step": 1, "layer": 4, "counts": [0, 1]}]
    data = load_heat(write(tmp_path, "s.jsonl", "\n".join(map(json.dumps, lines)) + "\n\n"))
    assert data.heat.shape == (2, 2, 2)
    assert data.layer_ids == [3, 4]
    assert data.heat[0].tolist() == [[5, 6], [7, 8]]  # sorted by step


def test_step_jsonl_whole_step_lines(tmp_path: Path) -> None:
    lines = [{"step": 0, "counts": [[0, 0], [1, 2]]}, {"step": 1, "counts": [[0, 0], [3, 4]]}]
    data = load_heat(write(tmp_path, "s.jsonl", "\n".join(map(json.dumps, lines))))
    assert data.heat.shape == (2, 1, 2)
    assert data.layer_ids == [1]


@pytest.mark.parametrize(("lines", "message"), [
    ([{"step": 0, "layer": 0, "counts": [1]}, {"step": 0, "layer": 0, "counts": [1]}],
     "s.jsonl line 2: step 0 layer 0 appears twice"),
    ([{"step": 0, "layer": 0, "counts": [1]}, {"step": 0, "layer": 1, "counts": [1]},
      {"step": 1, "layer": 0, "counts": [1]}], "s.jsonl: step 1 lacks layer 1"),
    ([{"step": 0, "layer": 0, "counts": [1]}, {"step": 1, "counts": [[1]]}],
     "s.jsonl line 2: expected keys 'step', 'layer', 'counts' like line 1"),
    ([{"step": "a", "counts": [[1]]}], "s.jsonl line 1: 'step' must be an integer"),
    ([{"step": 0, "counts": [[1]]}, {"step": 0, "counts": [[1]]}], "s.jsonl line 2: step 0 appears twice"),
    ([{"step": 0, "counts": [[1, 2]]}, {"step": 1, "counts": [[1]]}],
     "step 1: layer 0 has 1 values, expected 2"),
])
def test_step_jsonl_errors(tmp_path: Path, lines: list[dict[str, object]], message: str) -> None:
    with pytest.raises(HeatError) as info:
        load_heat(write(tmp_path, "s.jsonl", "\n".join(map(json.dumps, lines))))
    assert message in str(info.value)


def route(req: str, token: int, ids: list[int], layer: int = 0) -> dict[str, object]:
    return {"type": "route", "req_id": req, "token_idx": token, "layer": layer, "topk_ids": ids}


def test_synthetic_routes_warmup_detected(tmp_path: Path) -> None:
    rows = [{"type": "meta", "top_k": 2, "num_experts": 6}]
    rows += [route("r1", t, [0, 1]) for t in range(5)]  # warm-up: one expert set for every token
    rows += [route("r1", 0, [2, 3]), route("r1", 1, [3, 2]), route("r1", 2, [4, 2])]
    rows += [route("r2", 0, [1, 0])]  # a one-token request is not a warm-up pass
    data = load_heat(write(tmp_path, "r.jsonl", "\n".join(map(json.dumps, rows))))
    assert data.heat.tolist() == [[1, 1, 3, 2, 1, 0]]
    assert data.notes == ["layer 0: dropped 5 rows in 1 warm-up passes (every token picked the same experts, "
                          "e.g. [0, 1]); kept 4 rows in 2 passes"]


@pytest.mark.parametrize(("row", "message"), [
    (route("r", 0, [1, 2, 3]), "r.jsonl line 2: 3 topk_ids, expected top_k=2"),
    (route("r", 0, [1, 9]), "r.jsonl: expert id 9 out of range for num_experts=6"),
    ({"type": "route", "req_id": "r", "token_idx": 0, "layer": 0}, "r.jsonl line 2: 'topk_ids' must be"),
])
def test_bad_routes_rejected(tmp_path: Path, row: dict[str, object], message: str) -> None:
    rows = [{"type": "meta", "top_k": 2, "num_experts": 6}, row]
    with pytest.raises(HeatError) as info:
        load_heat(write(tmp_path, "r.jsonl", "\n".join(map(json.dumps, rows))))
    assert message in str(info.value)


def test_episodes_reject_bad_length(tmp_path: Path) -> None:
    path = write(tmp_path, "r.jsonl", json.dumps(route("r", 0, [1, 2])))
    with pytest.raises(HeatError, match="tokens per episode must be positive"):
        routes_to_episodes(path, 0)
    with pytest.raises(HeatError, match="1 kept tokens make no episode of 2"):
        routes_to_episodes(path, 2)


@pytest.mark.parametrize(("content", "message"), [
    ('{"physical_to_logical_map": [[0, 1]]}', "placement (expert map) file, not heat"),
    ('{"foo": 1}', "unknown heat format (expected 'logical_count' or 'counts', found ['foo'])"),
    ('{"logical_count": [[1, 2]', "not valid JSON"),
    ("", "not valid JSON"),
])
def test_unknown_files_rejected(tmp_path: Path, content: str, message: str) -> None:
    with pytest.raises(HeatError) as info:
        load_heat(write(tmp_path, "x.json", content))
    assert message in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(HeatError, match=r"nope\.json: no such file"):
        load_heat(tmp_path / "nope.json")


# ----------------------------------------------------------------------------- compact and .pt


@pytest.mark.parametrize("heat", [np.array([[3.0, 0.0], [1.0, 7.0]]), np.array([[[0.5, 1.0]], [[2.0, 0.0]]])])
def test_compact_round_trip(tmp_path: Path, heat: np.ndarray) -> None:
    data = HeatData(heat=heat, layer_ids=[5, 9][: heat.shape[-2]], source="unit", notes=["a note"])
    path = tmp_path / "h.npz"
    save_compact(path, data)
    back = load_heat(path)
    assert back.heat.dtype == np.float64
    assert np.array_equal(back.heat, heat)
    assert (back.layer_ids, back.source, back.notes) == (data.layer_ids, "unit", ["a note"])


def test_compact_stores_integer_counts_compactly(tmp_path: Path) -> None:
    path = tmp_path / "h.npz"
    save_compact(path, HeatData(heat=np.array([[3.0, 4.0]]), layer_ids=[0], source="s"))
    with np.load(path) as npz:
        assert npz["heat"].dtype == np.uint32


def test_compact_missing_key_rejected(tmp_path: Path) -> None:
    path = tmp_path / "h.npz"
    np.savez(path, heat=np.ones((1, 2)))
    with pytest.raises(HeatError, match=r"h\.npz: compact heat file lacks layer_ids, source"):
        load_heat(path)


def test_default_heat_is_bundled_deepseek_prefill() -> None:
    data = load_heat(default_heat_path())
    assert data.heat.shape == (58, 256)
    assert data.layer_ids == list(range(3, 61))
    assert "sglang issue 6017" in data.source
    assert (data.heat.sum(axis=1) == 67_108_864).all()


def test_default_heat_equals_its_shared_original(shared_data: Path) -> None:
    data = load_heat(default_heat_path())
    original = load_heat(shared_data / "heat" / "deepseek_v3" / "prefill_in1024.json")
    assert np.array_equal(data.heat, original.heat)


def test_pt_round_trip(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    counts = torch.tensor([[0, 0], [3, 1], [2, 2]], dtype=torch.int64)
    torch.save({"logical_count": counts, "rank": 0}, tmp_path / "d.pt")
    data = load_heat(tmp_path / "d.pt")
    assert data.heat.tolist() == [[3, 1], [2, 2]] and data.layer_ids == [1, 2]
    torch.save(counts.float(), tmp_path / "bare.pt")
    assert load_heat(tmp_path / "bare.pt").heat.shape == (2, 2)
    torch.save({"other": counts}, tmp_path / "no.pt")
    with pytest.raises(HeatError, match=r"no.pt: .pt dict has no 'logical_count' \(keys: \['other'\]\)"):
        load_heat(tmp_path / "no.pt")


def test_counts_whose_layer_total_overflows_are_rejected_not_turned_into_nan(tmp_path):
    from eplbctl.heat import HeatError, load_heat

    path = tmp_path / "huge.json"
    path.write_text('{"logical_count": [[1e308, 1e308], [1, 2]]}')
    with pytest.raises(HeatError, match="counts too large"):
        load_heat(path)


def test_absurdly_nested_json_is_a_one_line_error_not_a_recursion_traceback(tmp_path):
    from eplbctl.heat import HeatError, load_heat

    path = tmp_path / "deep.json"
    path.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(HeatError, match="nested too deeply"):
        load_heat(path)


@pytest.mark.parametrize(("digits", "message"), [(400, "a count too large to be a number of tokens"),
                                                 (5000, "a number with thousands of digits")])
def test_a_count_with_hundreds_of_digits_is_bad_data_naming_the_file(tmp_path: Path, digits: int,
                                                                     message: str) -> None:
    path = tmp_path / "big.json"
    path.write_text('{"logical_count": [[1, ' + "9" * digits + "]]}")
    with pytest.raises(HeatError, match=f"big.json.*{message}") as info:
        load_heat(path)
    assert "set_int_max_str_digits" not in str(info.value)


def test_a_device_or_directory_is_not_called_missing(tmp_path: Path) -> None:
    with pytest.raises(HeatError, match="/dev/null: not valid JSON"):
        load_heat("/dev/null")
    with pytest.raises(HeatError, match="is a directory"):
        load_heat(tmp_path)
