"""LRGB on the shared framework (issue 9): every table member composes with the paper's and the
tiny values, one fast_dev_run step per member on 64 real molecules, the best-validation-epoch
selection, node-relabelling invariance of every model, and a missing dataset's message."""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from torch_geometric.data import Batch, Data

from chimera.models.graph import build_lrgb_model
from tasks.core.driver import METRICS_FILE, apply_model_size, train
from tasks.core.errors import DataNotFoundError
from tasks.core.tables import load_spec
from tasks.graph.data import LRGBDataModule, PeptidesFuncRaw
from tasks.graph.module import BestEpoch, LRGBModule

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
RELEASE = Path(os.environ.get("CHIMERA_PEPTIDES_DIR", ROOT.parent / "shared/data/peptides-func"))
needs_release = pytest.mark.skipif(not (RELEASE / PeptidesFuncRaw.CSV).is_file(),
                                   reason=f"the Peptides-func release is not at {RELEASE}")
TABLES = ("graph/table4", "graph/table5", "graph/kablation")
MODELS = ("chimera", "chimera_neumann", "chimera_dag", "gcn", "gatedgcn", "gine", "gps")


def compose_cfg(overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir or "/tmp/unused")
    HydraConfig.instance().set_config(cfg)
    return apply_model_size(cfg)


def sweep_members(experiment: str, preset: str) -> list[list[str]]:
    """The sweep's members as override lists, with the preset's sweep parameters (the tiny
    preset restricts the datasets to Peptides-func)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}",
                                          f"preset=graph/{preset}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    keys = [k for k in params if k != "seed"]
    values = [str(params[k]).split(",") for k in keys]
    return [[f"{k}={v}" for k, v in zip(keys, combo, strict=True)]
            for combo in itertools.product(*values)]


MEMBERS = [(t, p, m) for t in TABLES for p in ("paper", "tiny") for m in sweep_members(t, p)]


def member_id(p):
    return p if isinstance(p, str) else "-".join(x.split("=")[1].split("/")[-1] for x in p)


@pytest.mark.slow  # composes every paper member (~36 configs)
def test_sweeps_cover_the_table_rows():
    for table in TABLES:
        spec = load_spec(table)
        wanted = {r["where"]["model"] for r in spec["rows"] if r.get("where")}
        members = {r["member"] for r in spec["rows"] if r.get("member")}
        got_models, got_members, datasets = set(), set(), set()
        for m in sweep_members(table, "paper"):
            cfg = compose_cfg([f"experiment={table}", "preset=graph/paper", *m])
            got_models.add(cfg.meta.model)
            got_members.add(cfg.member)
            datasets.add(cfg.meta.dataset)
        if table == "graph/kablation":
            assert got_members == members == {"k1", "k2", "k3", "k4"}
            assert datasets == {"peptides-struct"}
        else:
            assert got_models == wanted  # every row has a sweep member and vice versa
            assert datasets == {"peptides-func", "peptides-struct", "pascalvoc-sp", "coco-sp"}
        col_sets = [c["where"]["dataset"] for c in spec["columns"]]
        assert len(col_sets) == len(set(col_sets))
    # tiny: Peptides-func only (the one LRGB dataset available offline)
    assert all("data=graph/peptides_func" in m for m in sweep_members("graph/table4", "tiny"))


@pytest.mark.parametrize("table,preset,member", MEMBERS,
                         ids=lambda p: member_id(p) if not isinstance(p, str) else p)
def test_experiment_member_composes(table, preset, member):
    cfg = compose_cfg([f"experiment={table}", f"preset=graph/{preset}", *member])
    net, model, data = cfg.model.net, cfg.model, cfg.data
    assert "sizes" not in model and model._target_.endswith("LRGBModule")
    assert model.dataset == data.name == net.dataset
    assert cfg.optimized_metric == f"best/val_{cfg.lrgb.metric}"
    assert cfg.callbacks.best_epoch._target_.endswith("BestEpoch")
    assert data.test_each_epoch and cfg.trainer.gradient_clip_val == 1.0
    assert model.optimizer.name == "Adam" and model.optimizer.weight_decay == 0.0
    if preset == "paper":
        lr = {"peptides-func": 1e-3, "peptides-struct": 1.5e-3}.get(data.name, 3.5e-3)
        assert model.optimizer.lr == lr and cfg.trainer.max_epochs == 200
        assert data.source == "pyg" and data.subset_train is None
        assert data.batch_size == (64 if data.name.startswith("peptides") else 32)
        assert net.hidden == 64 and net.num_layers == 8  # Table 11
    else:
        assert data.name == "peptides-func" and data.source == "raw"
        assert data.subset_train and net.hidden == 32 and net.num_layers == 2
    if table == "graph/kablation":
        assert net.method == "neumann" and net.k_mode == "diameter"
        assert cfg.member == f"k{net.k_factor}"


@pytest.mark.parametrize("name", MODELS)
def test_paper_models_are_under_500k_parameters(name):
    cfg = compose_cfg(["experiment=graph/table4", "preset=graph/paper", f"model=graph/{name}"])
    for dataset in ("peptides-func", "peptides-struct"):
        with open_dict(cfg):
            cfg.model.net.dataset = dataset
        net = instantiate(cfg.model.net)
        n = sum(p.numel() for p in net.parameters())
        assert n < 520_000, (name, dataset, n)  # the paper's own Table 11 says 504k on struct
        if name.startswith("chimera"):
            assert n > 400_000  # the full Table 11 model, not the tiny one


# --------------------------------------------------------------------------- the module
def _toy_batch(num_graphs: int = 3, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    graphs = []
    for k in range(num_graphs):
        n = 4 + k
        a = torch.arange(n)
        ring = torch.stack([a, (a + 1) % n])
        ei = torch.cat([ring, ring.flip(0)], 1)
        x = torch.stack([torch.randint(0, d, (n,), generator=g) for d in (119, 5, 12, 12, 10, 6,
                                                                          6, 2, 2)], 1)
        ea = torch.stack([torch.randint(0, d, (ei.shape[1],), generator=g) for d in (5, 6, 2)], 1)
        y = (torch.rand(1, 10, generator=g) > 0.5).float()
        graphs.append(Data(x=x, edge_index=ei, edge_attr=ea, y=y, num_nodes=n))
    return Batch.from_data_list(graphs)


@pytest.mark.parametrize("name", MODELS)
def test_model_is_invariant_to_node_relabelling(name):
    """Relabel the nodes of every graph (a permutation within each graph, edges renamed with
    it): graph-level outputs are unchanged. Float64 so that only the model's maths counts."""
    torch.manual_seed(0)
    cfg = compose_cfg(["experiment=graph/table4", "preset=graph/tiny", f"model=graph/{name}"])
    net = instantiate(cfg.model.net).double().eval()
    batch = _toy_batch()
    graphs = batch.to_data_list()
    g = torch.Generator().manual_seed(1)
    permuted = []
    for d in graphs:
        perm = torch.randperm(d.num_nodes, generator=g)  # new position i holds old node perm[i]
        if name == "chimera_dag":
            # the BFS-DAG decomposition roots each graph at its first node: the model is
            # invariant to relabellings that keep the root (a different root is a different DAG
            # pair, by design)
            perm = torch.cat([torch.zeros(1, dtype=torch.long),
                              1 + torch.randperm(d.num_nodes - 1, generator=g)])
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(d.num_nodes)
        permuted.append(Data(x=d.x[perm], edge_index=inv[d.edge_index], edge_attr=d.edge_attr,
                             y=d.y, num_nodes=d.num_nodes))
    with torch.no_grad():
        a = net(batch)
        b = net(Batch.from_data_list(permuted))
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_module_loss_metric_and_no_decay_groups():
    net = build_lrgb_model("peptides-func", hidden=16, num_layers=1, d_state=4)
    assert net.no_weight_decay() and all("mixer" in n for n in net.no_weight_decay())
    module = LRGBModule(net, "peptides-func", {"name": "Adam", "lr": 1e-3},
                        {"decay": "cosine", "warmup": 0})
    batch = _toy_batch()
    loss = module.training_loss(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert module.batch_size_of(batch) == 3 and module.task.metric == "ap"
    assert set(module.metrics) == {"val_raw", "val_ema_", "test_raw", "test_ema_"}
    with pytest.raises(ValueError, match="unknown LRGB dataset"):
        LRGBModule(net, "zinc", {"name": "Adam"}, {})


# --------------------------------------------------------------------------- best epoch
class _Trainer:
    def __init__(self) -> None:
        self.sanity_checking = False
        self.current_epoch = 0
        self.callback_metrics: dict[str, torch.Tensor] = {}


class _Module:
    def __init__(self, task=None) -> None:
        self.task = task
        self.logged: dict[str, float] = {}

    def log(self, key: str, value, **_) -> None:
        self.logged[key] = float(value)


@pytest.mark.parametrize("mode,vals,best", [("max", [0.3, 0.5, 0.5, 0.4], 1),
                                            ("min", [0.3, 0.2, 0.25, 0.2], 1)])
def test_best_epoch_reports_test_at_the_best_validation_epoch(mode, vals, best):
    cb = BestEpoch(metric="m", mode=mode)
    trainer, module = _Trainer(), _Module()
    tests = [0.9, 0.1, 0.7, 0.8]
    for epoch, (v, t) in enumerate(zip(vals, tests, strict=True)):
        trainer.current_epoch = epoch
        trainer.callback_metrics = {"val/m": torch.tensor(v), "test/m": torch.tensor(t),
                                    "val/ema_m": torch.tensor(1.0 - v)}
        cb.on_validation_epoch_end(trainer, module)
        cb.on_train_epoch_end(trainer, module)
    # ties keep the earlier epoch; the test score is the one of that epoch, not the best test
    assert module.logged["best/epoch_m"] == best
    assert module.logged["best/val_m"] == pytest.approx(vals[best])
    assert module.logged["best/test_m"] == pytest.approx(tests[best])
    assert math.isnan(module.logged["best/test_ema_m"])  # no test/ema_m logged
    # the state round-trips (resume continues the selection)
    again = BestEpoch(metric="m", mode=mode)
    again.load_state_dict(cb.state_dict())
    assert again.best == cb.best
    # an epoch without validation (sanity check only) changes nothing
    trainer.sanity_checking, trainer.current_epoch = True, 9
    trainer.callback_metrics = {"val/m": torch.tensor(100.0 if mode == "max" else -1.0)}
    cb.on_validation_epoch_end(trainer, module)
    cb.on_train_epoch_end(trainer, module)
    assert cb.best[""]["epoch"] == best


def test_best_epoch_takes_metric_and_mode_from_the_task():
    from tasks.graph.metrics import LRGB_TASKS

    cb = BestEpoch()
    cb.setup(_Trainer(), _Module(LRGB_TASKS["peptides-struct"]), "fit")
    assert (cb.metric, cb.mode) == ("mae", "min")
    with pytest.raises(ValueError, match="metric="):
        BestEpoch().setup(_Trainer(), _Module(None), "fit")
    with pytest.raises(ValueError, match="mode"):
        BestEpoch(mode="up")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- data
def test_missing_data_names_the_config_key(tmp_path):
    cfg = compose_cfg(["experiment=graph/table5", "preset=graph/tiny",
                       f"data.root={tmp_path / 'nowhere'}"], tmp_path / "run")
    dm = instantiate(cfg.data)
    with pytest.raises(DataNotFoundError, match=r"Set data\.root=") as e:
        dm.prepare_data()
    assert str(tmp_path / "nowhere") in str(e.value)
    dm = LRGBDataModule("peptides-struct", tmp_path, source="pyg", download=False)
    with pytest.raises(DataNotFoundError, match=r"download is off.*Set data\.root="):
        dm.prepare_data()


@needs_release
def test_datamodule_train_loader_is_resumable_and_shuffled(tmp_path):
    dm = LRGBDataModule("peptides-func", RELEASE, source="raw", batch_size=8, subset=64,
                        cache_dir=tmp_path, seed=3, test_each_epoch=True)
    dm.setup()
    loader = dm.train_dataloader()
    first = [b.num_nodes for b in loader]
    assert len(first) == -(-len(dm.datasets["train"]) // 8)
    loader.sampler.set_epoch(1)
    assert [b.num_nodes for b in loader] != first  # a new order per epoch
    val, test = dm.val_dataloader()
    assert len(val.dataset) == len(dm.datasets["val"]) and len(test.dataset) == len(
        dm.datasets["test"])
    small = LRGBDataModule("peptides-func", RELEASE, source="raw", subset=64, cache_dir=tmp_path,
                           subset_train=10, subset_val=3)
    small.setup()
    assert len(small.datasets["train"]) == 10 and len(small.datasets["val"]) == 3


# --------------------------------------------------------------------------- fast_dev_run
SLOW_ON_CPU = ("chimera", "chimera_neumann", "chimera_dag")  # 15-40 s each on 2 shared cores


@needs_release
@pytest.mark.parametrize("name", [pytest.param(m, marks=pytest.mark.slow) if m in SLOW_ON_CPU
                                  else m for m in MODELS])
def test_fast_dev_run_per_member(name, tmp_path):
    cache = tmp_path.parent / "peptides64"  # shared by the members of this test
    cfg = compose_cfg(["experiment=graph/table5", "preset=graph/tiny", f"model=graph/{name}",
                       "data.subset=64", f"data.cache_dir={cache}", "data.batch_size=8",
                       "data.eval_batch_size=16", "model.net.hidden=16", "model.net.num_layers=2",
                       "+trainer.fast_dev_run=true", "logger=none"], tmp_path)
    result, objs = train(cfg)
    metrics = result["metrics"]
    for key in ("val/ap", "test/ap", "best/val_ap", "best/test_ap", "train/loss_epoch"):
        assert key in metrics and math.isfinite(metrics[key]), (key, metrics)
    saved = json.loads((tmp_path / METRICS_FILE).read_text())
    assert saved["member"] == f"{cfg.model.name}-peptides-func"
    assert saved["meta"] == {"model": cfg.model.name, "dataset": "peptides-func"}
    assert 0 < saved["params"] < 100_000


# --------------------------------------------------------------------------- size buckets
@pytest.mark.parametrize("method,k_mode", [("exact", "diameter"), ("neumann", "diameter"),
                                           ("neumann", "max_nodes"), ("dag", "diameter")])
def test_size_buckets_give_the_unbucketed_result(method, k_mode):
    """Chimera on buckets of similarly sized graphs (less padding) equals one call on the whole
    batch, values and gradients, with pre-computed structure or without."""
    from tasks.graph.transforms import ChimeraStructure

    torch.manual_seed(0)
    graphs = _toy_batch(num_graphs=7, seed=3).to_data_list()
    graphs = [graphs[i] for i in (3, 0, 6, 1, 5, 2, 4)]  # sizes out of order in the batch
    for use_structure in (False, True):
        data = [ChimeraStructure()(d.clone()) if use_structure else d for d in graphs]
        batch = Batch.from_data_list(data)
        outs, grads = [], []
        for per_bucket in (None, 3):
            torch.manual_seed(0)
            net = build_lrgb_model("peptides-func", hidden=8, num_layers=1, d_state=4,
                                   method=method, k_mode=k_mode, k_factor=2,
                                   graphs_per_bucket=per_bucket).double()
            net.eval()
            y = net(batch)
            y.square().sum().backward()
            outs.append(y.detach())
            grads.append(torch.cat([p.grad.flatten() for p in net.parameters()
                                    if p.grad is not None]))
        for y, g in zip(outs[1:], grads[1:], strict=True):
            torch.testing.assert_close(y, outs[0], rtol=1e-10, atol=1e-10)
            # (float64; the DAG sweeps sum in another order per bucket: ~1e-10 apart)
            torch.testing.assert_close(g, grads[0], rtol=1e-7, atol=1e-9)


def test_bucket_graphs_partitions_nodes_and_edges():
    from chimera.models.graph import bucket_graphs

    batch = _toy_batch(num_graphs=5)
    b = bucket_graphs(batch.edge_index, batch.batch, 5, 2)
    assert [p.graph_ids.tolist() for p in b.parts] == [[0, 1], [2, 3], [4]]  # by size
    nodes = torch.cat([p.node_ids for p in b.parts]).sort().values
    edges = torch.cat([p.edge_ids for p in b.parts]).sort().values
    assert torch.equal(nodes, torch.arange(batch.num_nodes))
    assert torch.equal(edges, torch.arange(batch.num_edges))
    with pytest.raises(ValueError, match="graphs_per_bucket"):
        bucket_graphs(batch.edge_index, batch.batch, 5, 0)
    auto = bucket_graphs(batch.edge_index, batch.batch, 5, "auto")
    assert sorted(torch.cat([p.graph_ids for p in auto.parts]).tolist()) == list(range(5))
    with pytest.raises(ValueError, match="one entry per graph"):
        bucket_graphs(batch.edge_index, batch.batch, 5, "auto", diameter=torch.ones(3))
    for bad in ("many", None, True):
        with pytest.raises(ValueError, match="graphs_per_bucket"):
            bucket_graphs(batch.edge_index, batch.batch, 5, bad)


def test_auto_bucket_sizes_minimise_the_cost_model():
    """``graphs_per_bucket="auto"``: the partition of the size-sorted graphs into runs is the
    cheapest under ``overhead + graphs x n_pad^2`` per bucket (against every composition of
    small cases); no overhead gives one graph per bucket, a huge one a single bucket."""
    import itertools

    from chimera.models.graph import MAX_GRAPHS_PER_BUCKET, bucket_sizes_auto

    def cost(counts, sizes, overhead):
        total, start = 0.0, 0
        for k in sizes:
            pad = -(-counts[start + k - 1] // 8) * 8
            total += overhead + k * pad * pad
            start += k
        return total

    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        n = 1 + trial % 7
        counts = sorted(torch.randint(1, 400, (n,), generator=g).tolist())
        overhead = [0.0, 5e3, 3e4, 2e5][trial % 4]
        sizes = bucket_sizes_auto(counts, overhead)
        assert sum(sizes) == n and min(sizes) >= 1
        best = min(cost(counts, [b - a for a, b in zip((0, *cuts), (*cuts, n), strict=True)],
                        overhead)
                   for r in range(n) for cuts in itertools.combinations(range(1, n), r))
        assert cost(counts, sizes, overhead) == pytest.approx(best)
    counts = list(range(10, 170, 10))
    assert bucket_sizes_auto(counts, 0.0) == [1] * 16
    assert bucket_sizes_auto(counts, 1e12) == [16]
    many = bucket_sizes_auto([50] * 100, 1e12)
    assert max(many) == MAX_GRAPHS_PER_BUCKET and sum(many) == 100
