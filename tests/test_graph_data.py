"""LRGB data (issue 9): OGB featurisation, the offline Peptides-func loader on the first 200
molecules of the real release, caching, safe loading of PyG's LRGB files, the structure
transform and the LightningDataModule."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import time
from pathlib import Path

import pytest
import torch
from torch_geometric.data import Batch, Data

from chimera.models.graph import ATOM_FEATURE_DIMS, BOND_FEATURE_DIMS, build_lrgb_model
from chimera.topology import from_edge_index
from chimera.topology.decompose import bfs_depth_reference
from tasks.graph import data as gdata
from tasks.graph.data import (
    LRGBDataModule,
    PeptidesFuncRaw,
    RestrictedUnpickler,
    SafeLRGBDataset,
    restricted_pickle_load,
    smiles_to_graph,
    strict_torch_load,
)
from tasks.graph.transforms import ChimeraStructure, validate_graph

RELEASE = Path(os.environ.get("CHIMERA_PEPTIDES_DIR",
                              Path(__file__).resolve().parents[2] / "shared/data/peptides-func"))
needs_release = pytest.mark.skipif(not (RELEASE / PeptidesFuncRaw.CSV).is_file(),
                                   reason=f"the Peptides-func release is not at {RELEASE}")
SUBSET = 200


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("peptides_cache")


@pytest.fixture(scope="module")
def train200(cache) -> PeptidesFuncRaw:
    return PeptidesFuncRaw(RELEASE, "train", cache_dir=cache, subset=SUBSET)


# --------------------------------------------------------------------------- featurisation
def test_ogb_featurisation_of_the_reference_molecule():
    # the example documented in ogb.utils.features: atom 1 is the chiral carbon, bond 2 the
    # stereo double bond
    x, ei, ea = smiles_to_graph("Cl[C@H](/C=C/C)Br")
    assert x[1].tolist() == [5, 2, 4, 5, 1, 0, 2, 0, 0]
    assert ea[2 * 2].tolist() == [1, 2, 0] and ea[2 * 2 + 1].tolist() == [1, 2, 0]
    assert x.shape == (6, 9) and ei.shape == (2, 10) and ea.shape == (10, 3)
    assert torch.equal(ei[:, 0::2], ei[:, 1::2].flip(0))  # both directions of every bond
    for col, dim in enumerate(ATOM_FEATURE_DIMS):
        assert int(x[:, col].max()) < dim
    x, ei, ea = smiles_to_graph("C")  # a single atom, no bonds
    assert x.shape == (1, 9) and ei.shape == (2, 0) and ea.shape == (0, 3)
    x, ei, _ = smiles_to_graph("[Na+].[Cl-]")  # two components, no edges
    assert x.shape[0] == 2 and ei.shape[1] == 0
    assert smiles_to_graph("[U]")[0][0, 0] == 91  # atomic number 92 -> index 91
    with pytest.raises(ValueError, match="cannot parse"):
        smiles_to_graph("C1CC(")


# --------------------------------------------------------------------------- raw release
@needs_release
def test_raw_subset_split_features_and_structure(train200, cache):
    splits = json.loads((RELEASE / PeptidesFuncRaw.SPLITS).read_text())
    val = PeptidesFuncRaw(RELEASE, "val", cache_dir=cache, subset=SUBSET)
    test = PeptidesFuncRaw(RELEASE, "test", cache_dir=cache, subset=SUBSET)
    assert len(train200) + len(val) + len(test) == SUBSET
    assert train200.indices() == [i for i in splits["train"] if i < SUBSET]
    assert test.indices() == [i for i in splits["test"] if i < SUBSET]
    d = train200[0]
    assert d.x.dtype == torch.long and d.x.shape[1] == 9 and d.edge_attr.shape[1] == 3
    assert d.y.shape == (1, 10) and set(d.y.unique().tolist()) <= {0.0, 1.0}
    for col, dim in enumerate(BOND_FEATURE_DIMS):
        assert int(d.edge_attr[:, col].max()) < dim
    # the cached structure equals the sequential oracles of chimera.topology
    for k in range(0, len(train200), 40):
        g = train200[k]
        topo = from_edge_index(g.edge_index, g.num_nodes)
        assert torch.equal(g.bfs_depth, bfs_depth_reference(topo))
        assert g.diameter.tolist() == topo._bfs_diameter().tolist()
    sizes = torch.tensor([g.num_nodes for g in train200], dtype=torch.float)
    assert 100 < float(sizes.mean()) < 200  # LRGB: 150.94 atoms on average over the release


@needs_release
def test_raw_cache_is_reused(train200, cache, monkeypatch):
    files = list(cache.glob("peptides_func_v*_first200_structure.pt"))
    assert len(files) == 1 and PeptidesFuncRaw.MD5[:12] in files[0].name

    def no_parse(*a, **k):
        raise AssertionError("parsed again although the cache exists")

    monkeypatch.setattr(gdata, "_parse_rows", no_parse)
    t = time.perf_counter()
    again = PeptidesFuncRaw(RELEASE, "train", cache_dir=cache, subset=SUBSET)
    assert time.perf_counter() - t < 5.0
    assert torch.equal(again[3].x, train200[3].x)


def test_missing_release_names_the_path_and_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist\. Set data\.root=") as e:
        PeptidesFuncRaw(tmp_path / "nowhere", cache_dir=tmp_path)
    assert str(tmp_path / "nowhere") in str(e.value)


def _fake_release(root: Path, smiles: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = [",smiles,peptide_seq,labels,identifier"]
    for i, s in enumerate(smiles):
        lab = [int((i + j) % 3 == 0) for j in range(10)]
        lines.append(f'{i},{s},X,"{lab}",{i}')
    with gzip.open(root / PeptidesFuncRaw.CSV, "wt") as f:
        f.write("\n".join(lines) + "\n")
    n = len(smiles)
    (root / PeptidesFuncRaw.SPLITS).write_text(json.dumps(
        {"train": list(range(0, n - 2)), "val": [n - 2], "test": [n - 1]}))
    return root


def test_small_release_md5_edge_cases_and_bad_rows(tmp_path):
    rel = _fake_release(tmp_path / "rel", ["CCO", "C", "[Na+].[Cl-]", "c1ccccc1", "CC(=O)O"])
    with pytest.raises(ValueError, match="md5"):
        PeptidesFuncRaw(rel, cache_dir=tmp_path / "c")
    ds = PeptidesFuncRaw(rel, "train", cache_dir=tmp_path / "c", check_md5=False)
    assert len(ds) == 3
    single, salt = ds[1], ds[2]
    assert single.num_nodes == 1 and single.edge_index.shape[1] == 0
    assert single.diameter.tolist() == [0] and single.bfs_depth.tolist() == [0]
    assert salt.num_nodes == 2 and salt.bfs_depth.tolist() == [0, 0]
    # a batch of edgeless molecules runs through every Chimera variant
    b = Batch.from_data_list([single, salt])
    for method in ("exact", "neumann", "dag"):
        m = build_lrgb_model("peptides-func", hidden=16, num_layers=1, d_state=4, method=method)
        assert torch.isfinite(m(b)).all()
    bad = _fake_release(tmp_path / "bad", ["CCO", "C1CC(", "C", "C"])
    with pytest.raises(ValueError, match="row 1 of the Peptides-func csv"):
        PeptidesFuncRaw(bad, cache_dir=tmp_path / "c2", check_md5=False)


def test_parallel_parse_equals_serial(tmp_path):
    rel = _fake_release(tmp_path / "rel", ["CCO", "C", "c1ccccc1", "CC(=O)O", "CCN", "O=C=O"])
    a = PeptidesFuncRaw(rel, "train", cache_dir=tmp_path / "a", check_md5=False)
    b = PeptidesFuncRaw(rel, "train", cache_dir=tmp_path / "b", check_md5=False, parse_workers=2)
    for i in range(len(a)):
        assert torch.equal(a[i].x, b[i].x) and torch.equal(a[i].edge_index, b[i].edge_index)


# --------------------------------------------------------------------------- data module
@needs_release
def test_datamodule_raw_batches_feed_the_model(train200, cache):
    dm = LRGBDataModule("peptides-func", RELEASE, source="raw", batch_size=8, subset=SUBSET,
                        cache_dir=cache)
    dm.setup("fit")
    assert dm.task.metric == "ap" and dm.task.out_dim == 10
    batch = next(iter(dm.val_dataloader()))
    assert batch.num_graphs == 8 and batch.diameter.shape == (8,)
    assert batch.bfs_depth.shape == (batch.num_nodes,)
    # small batch for speed: pre-computed structure gives the same outputs as recomputing it
    small = Batch.from_data_list(batch.to_data_list()[:3])
    torch.manual_seed(0)
    for method in ("neumann", "dag"):
        m = build_lrgb_model("peptides-func", hidden=16, num_layers=1, d_state=4,
                             method=method).eval()
        plain = small.clone()
        del plain.bfs_depth, plain.diameter
        torch.testing.assert_close(m(small), m(plain))
    assert len(dm.train_dataloader()) == -(-len(dm.datasets["train"]) // 8)
    assert len(dm.test_dataloader().dataset) == len(dm.datasets["test"])


def test_datamodule_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown LRGB dataset"):
        LRGBDataModule("zinc", tmp_path)
    with pytest.raises(ValueError, match="source='raw' reads the official Peptides-func"):
        LRGBDataModule("coco-sp", tmp_path, source="raw")
    with pytest.raises(ValueError, match="batch_size"):
        LRGBDataModule("peptides-func", tmp_path, batch_size=0)
    dm = LRGBDataModule("peptides-func", tmp_path / "missing", source="raw")
    with pytest.raises(FileNotFoundError, match="data.root"):
        dm.setup()


# --------------------------------------------------------------------------- safe loading
def _lrgb_raw_graph(n: int, feat: int, edge_feat: int, y: torch.Tensor):
    a = torch.arange(n - 1)
    ei = torch.cat([torch.stack([a, a + 1]), torch.stack([a + 1, a])], 1)
    return (torch.randint(0, 2, (n, feat)), torch.randint(0, 2, (ei.shape[1], edge_feat)),
            ei, y)


def test_pyg_source_processes_generated_raw_files_safely(tmp_path):
    """SafeLRGBDataset (PyG's LRGBDataset, no download: the raw files exist) with the
    structure pre-transform; the superpixel pickles go through the restricted unpickler."""
    raw = tmp_path / "peptides-func" / "raw"
    raw.mkdir(parents=True)
    for split in ("train", "val", "test"):
        graphs = [_lrgb_raw_graph(n, 9, 3, torch.rand(1, 10).round()) for n in (4, 6, 5)]
        torch.save(graphs, raw / f"{split}.pt")
    ds = SafeLRGBDataset(str(tmp_path), "peptides-func", "val", pre_transform=ChimeraStructure())
    assert len(ds) == 3 and ds[1].diameter.tolist() == [5] and ds[1].bfs_depth.shape == (6,)
    # the batched structure pass over the collated storage gives the same per-graph values
    batched = SafeLRGBDataset(str(tmp_path), "peptides-func", "val", structure=True)
    assert Path(batched.processed_dir).name == "processed_structure"
    for i in range(3):
        assert torch.equal(batched[i].bfs_depth, ds[i].bfs_depth)
        assert torch.equal(batched[i].diameter, ds[i].diameter)
    raw = tmp_path / "pascalvoc-sp" / "raw"
    raw.mkdir(parents=True)
    for split in ("train", "val", "test"):
        graphs = [(torch.rand(n, 14), torch.rand(2 * n - 2, 2), _lrgb_raw_graph(n, 1, 1, None)[2],
                   torch.randint(0, 21, (n,))) for n in (5, 3)]
        with open(raw / f"{split}.pickle", "wb") as f:
            pickle.dump(graphs, f)
    dm = LRGBDataModule("pascalvoc-sp", tmp_path, source="pyg", batch_size=2)
    dm.setup()
    b = next(iter(dm.train_dataloader()))
    assert b.x.shape == (8, 14) and b.y.shape == (8,) and b.diameter.shape == (2,)
    assert dm.task.metric == "f1"


def test_restricted_unpickler_and_strict_load(tmp_path):
    obj = [(torch.arange(4), torch.rand(2, 3)), {"y": torch.tensor([1, 2])}]
    back = restricted_pickle_load(io.BytesIO(pickle.dumps(obj)))
    assert torch.equal(back[0][0], obj[0][0]) and torch.equal(back[1]["y"], obj[1]["y"])

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        restricted_pickle_load(io.BytesIO(pickle.dumps([Evil()])))
    assert ("builtins", "eval") not in RestrictedUnpickler.ALLOWED
    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(RuntimeError, match="weights_only=True"):
        strict_torch_load(path)


# --------------------------------------------------------------------------- transform
def test_structure_transform_single_and_batched():
    graphs = [Data(edge_index=torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1]]), num_nodes=3),
              Data(edge_index=torch.zeros(2, 0, dtype=torch.long), num_nodes=2),
              Data(edge_index=torch.tensor([[0, 1, 2, 3], [1, 0, 3, 2]]), num_nodes=4)]
    t = ChimeraStructure()
    one = [t(g.clone()) for g in graphs]
    assert [g.diameter.tolist() for g in one] == [[2], [0], [1]]
    assert one[2].bfs_depth.tolist() == [0, 1, 0, 1]  # two components, two roots
    b = t(Batch.from_data_list([g.clone() for g in graphs]))
    assert b.diameter.tolist() == [2, 0, 1]
    assert torch.equal(b.bfs_depth, torch.cat([g.bfs_depth for g in one]))
    with pytest.raises(ValueError, match="at least one node"):
        validate_graph(Data(edge_index=torch.zeros(2, 0, dtype=torch.long), num_nodes=0))
    with pytest.raises(ValueError, match="outside"):
        validate_graph(Data(edge_index=torch.tensor([[0], [3]]), num_nodes=2), "row 7")
    with pytest.raises(ValueError, match="edge_attr has 2 rows"):
        validate_graph(Data(edge_index=torch.tensor([[0], [1]]), edge_attr=torch.zeros(2, 3),
                            num_nodes=2))


# --------------------------------------------------------------------------- full release
@pytest.mark.slow
@needs_release
def test_full_release_parse(tmp_path):
    t = time.perf_counter()
    train = PeptidesFuncRaw(RELEASE, "train", cache_dir=tmp_path)
    took = time.perf_counter() - t
    val = PeptidesFuncRaw(RELEASE, "val", cache_dir=tmp_path)
    test = PeptidesFuncRaw(RELEASE, "test", cache_dir=tmp_path)
    assert (len(train), len(val), len(test)) == (10_873, 2_331, 2_331)
    s = train.slices["x"]
    sizes = (s[1:] - s[:-1]).float()
    assert sizes.numel() == 15_535 and abs(float(sizes.mean()) - 150.94) < 0.01
    dia = train._data.diameter
    assert int(dia.min()) >= 1 and int(dia.max()) <= 200
    print(f"parsed 15,535 molecules in {took:.0f} s; mean atoms {float(sizes.mean()):.2f}")
