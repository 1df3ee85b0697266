import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rwkv_mm.core.state import RWKVState

torch.set_num_threads(1)

VERSIONS = ["v4", "v5", "v6", "v7"]


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(42)


def random_state(version, L=3, B=5, C=32, head_size=8, dtype=torch.float32):
    zeros = RWKVState.zeros(version, L, B, C, head_size=head_size, dtype=dtype)
    return RWKVState(version, [{n: torch.randn_like(t) for n, t in layer.items()} for layer in zeros.layers])


@pytest.mark.parametrize(
    "version, names",
    [
        pytest.param("v4", ["att_shift", "num", "den", "max", "ffn_shift"], id="v4"),
        pytest.param("v5", ["att_shift", "wkv", "ffn_shift"], id="v5"),
        pytest.param("v7", ["att_shift", "wkv", "ffn_shift"], id="v7"),
    ],
)
def test_zeros_layout(version, names):
    s = RWKVState.zeros(version, num_layers=2, batch_size=3, dim=24, head_size=8, dtype=torch.bfloat16)
    assert s.batch_size == 3 and len(s.layers) == 2
    for layer in s.layers:
        assert list(layer) == names
        for n, t in layer.items():
            recurrent = n in ("wkv", "num", "den", "max")
            assert t.dtype == (torch.float32 if recurrent else torch.bfloat16), n
            assert t.shape == ((3, 3, 8, 8) if n == "wkv" else (3, 24)), n
            assert torch.all(t == (-1e30 if n == "max" else 0)), n


def test_zeros_float64():
    s = RWKVState.zeros("v7", 1, 2, 16, head_size=8, dtype=torch.float64)
    assert all(t.dtype == torch.float64 for t in s.layers[0].values())


@pytest.mark.parametrize("version", [pytest.param(v, id=v) for v in VERSIONS])
def test_select_concat_roundtrip(version):
    s = random_state(version)
    parts = [s.select([0, 1]), s.select([2]), s.select(torch.tensor([3, 4]))]
    assert [p.batch_size for p in parts] == [2, 1, 2]
    assert RWKVState.concat(parts).equal(s)

    picked = s.select([4, -5, 2])
    for layer, orig in zip(picked.layers, s.layers, strict=True):
        for n, t in layer.items():
            assert torch.equal(t, torch.stack([orig[n][4], orig[n][0], orig[n][2]])), n
    mask = torch.tensor([True, False, True, False, False])
    assert s.select(mask).equal(s.select([0, 2]))


@pytest.mark.parametrize(
    "method",
    [
        pytest.param(lambda s: s.clone(), id="clone"),
        pytest.param(lambda s: s.select(range(s.batch_size)), id="select"),
        pytest.param(lambda s: RWKVState.concat([s]), id="concat"),
    ],
)
def test_copies_do_not_alias(method):
    s = random_state("v7")
    before = s.clone()
    copy = method(s)
    assert copy.equal(s)
    for layer, orig in zip(copy.layers, s.layers, strict=True):
        for n, t in layer.items():
            assert t.untyped_storage().data_ptr() != orig[n].untyped_storage().data_ptr(), n
            t.add_(1.0)
    assert s.equal(before)


def test_to_keeps_recurrent_fp32():
    s = random_state("v4")
    half = s.to(dtype=torch.bfloat16)
    for layer in half.layers:
        assert layer["att_shift"].dtype == layer["ffn_shift"].dtype == torch.bfloat16
        assert layer["num"].dtype == layer["den"].dtype == layer["max"].dtype == torch.float32
    assert torch.equal(half.layers[0]["num"], s.layers[0]["num"])
    back = half.to(dtype=torch.float32)
    assert back.layers[0]["att_shift"].dtype == torch.float32
    f64 = s.to(dtype=torch.float64)
    assert all(t.dtype == torch.float64 for layer in f64.layers for t in layer.values())
    assert s.to("cpu").equal(s)


@pytest.mark.parametrize(
    "version, dtype",
    [
        pytest.param(v, d, id=f"{v}-{str(d).removeprefix('torch.')}")
        for v, d in [
            ("v4", torch.float32),
            ("v5", torch.float32),
            ("v6", torch.bfloat16),
            ("v7", torch.float16),
            ("v7", torch.float64),
        ]
    ],
)
def test_save_load_roundtrip(tmp_path, version, dtype):
    s = random_state(version, dtype=dtype)
    path = tmp_path / "state.safetensors"
    s.save(path)
    loaded = RWKVState.load(path)
    assert loaded.equal(s)
    assert list(loaded.layers[0]) == list(s.layers[0])
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "rwkv_mm.state" and meta["version"] == version and meta["num_layers"] == "3"
    assert ("value,key" in meta["layout"]) == (version != "v4")


def test_save_views(tmp_path):
    """Shift tensors are often views of a bigger activation; saving must not trip over shared storage."""
    x = torch.randn(2, 7, 16)
    s = RWKVState.zeros("v7", 1, 2, 16, head_size=8)
    layer = dict(s.layers[0], att_shift=x[:, -1], ffn_shift=x[:, -2])
    s = RWKVState("v7", [layer])
    s.save(tmp_path / "s.safetensors")
    assert RWKVState.load(tmp_path / "s.safetensors").equal(s)


def test_load_rejects_foreign_file(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not an rwkv_mm state file"):
        RWKVState.load(path)


def test_stack():
    s = random_state("v7", L=3, B=2, C=32, head_size=8)
    wkv = s.stack("wkv")
    assert wkv.shape == (3, 2, 4, 8, 8)
    assert all(torch.equal(wkv[i], s.layers[i]["wkv"]) for i in range(3))
    with pytest.raises(ValueError, match="num"):
        s.stack("num")


def test_equal():
    s = random_state("v6")
    other = s.clone()
    assert s.equal(other)
    wkv = other.layers[1]["wkv"]
    wkv[0, 0, 0, 0] = torch.nextafter(wkv[0, 0, 0, 0], torch.tensor(1e9))  # one ulp
    assert not s.equal(other)
    assert not s.equal(s.to(dtype=torch.float64))
    assert not s.equal(RWKVState(s.version, s.layers[:2]))


@pytest.mark.parametrize(
    "make, match",
    [
        pytest.param(lambda: RWKVState("v8", [{}]), "version", id="unknown-version"),
        pytest.param(lambda: RWKVState("v7", []), "at least one layer", id="no-layers"),
        pytest.param(lambda: RWKVState("v7", random_state("v4").layers), "needs", id="wrong-names"),
        pytest.param(
            lambda: RWKVState("v7", [dict(random_state("v7").layers[0], ffn_shift=torch.zeros(4, 32))]),
            "batch size 5",
            id="batch-mismatch",
        ),
        pytest.param(
            lambda: RWKVState.concat([random_state("v7"), random_state("v6")]),
            "cannot concat",
            id="concat-versions",
        ),
        pytest.param(
            lambda: RWKVState.zeros("v7", 1, 1, 30, head_size=8), "multiple of head_size", id="zeros-dim"
        ),
    ],
)
def test_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()
