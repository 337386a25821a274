"""Long Range Graph Benchmark data (Dwivedi et al. 2022): PyG's ``LRGBDataset`` for users with a
network, an offline loader for the official raw Peptides-func release, and a LightningDataModule.

* ``source="pyg"``: :class:`SafeLRGBDataset`, PyG's ``LRGBDataset`` (downloads on first use)
  with every file read safely: processed files with ``torch.load(weights_only=True)`` and no
  silent fallback (PyG 2.8's ``fs.torch_load`` retries with ``weights_only=False`` when the
  safe load fails), the raw ``.pickle`` files of PascalVOC-SP / COCO-SP through a restricted
  unpickler that only rebuilds tensors.
* ``source="raw"``: :class:`PeptidesFuncRaw`, the official Peptides-func release
  (``peptide_multi_class_dataset.csv.gz`` + the split as JSON) featurised here from SMILES with
  RDKit into OGB's 9 atom / 3 bond categorical features (:func:`smiles_to_graph`, written from
  the definitions of ``ogb.utils.features``), cached after the first parse.

Both attach the per-graph structure Chimera needs (BFS depths, diameters; see
:mod:`tasks.graph.transforms`) once, when the data is processed, for all graphs in one
vectorised pass.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import pickle
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from lightning import LightningDataModule
from torch import Tensor
from torch_geometric.data import Data, InMemoryDataset
from torch_geometric.datasets import LRGBDataset
from torch_geometric.loader import DataLoader
from torch_geometric.loader.dataloader import Collater

from tasks.core.data import ResumableDataLoader, train_loader
from tasks.core.errors import DataNotFoundError
from tasks.graph.metrics import LRGB_TASKS, LRGBTask
from tasks.graph.transforms import graph_structure, structure_for_graphs, validate_graph

LRGB_NAMES: tuple[str, ...] = ("peptides-func", "peptides-struct", "pascalvoc-sp", "coco-sp")

# ----------------------------------------------------------------------------- OGB featurisation
# The categorical vocabularies of ogb.utils.features (last entry "misc" = anything else).
ATOMIC_NUMS: tuple = (*range(1, 119), "misc")
CHIRALITY: tuple = ("CHI_UNSPECIFIED", "CHI_TETRAHEDRAL_CW", "CHI_TETRAHEDRAL_CCW", "CHI_OTHER",
                    "misc")
DEGREES: tuple = (*range(11), "misc")
FORMAL_CHARGES: tuple = (*range(-5, 6), "misc")
NUM_HS: tuple = (*range(9), "misc")
RADICAL_ELECTRONS: tuple = (*range(5), "misc")
HYBRIDISATIONS: tuple = ("SP", "SP2", "SP3", "SP3D", "SP3D2", "misc")
BOND_TYPES: tuple = ("SINGLE", "DOUBLE", "TRIPLE", "AROMATIC", "misc")
BOND_STEREO: tuple = ("STEREONONE", "STEREOZ", "STEREOE", "STEREOCIS", "STEREOTRANS",
                      "STEREOANY")


def _index_or_misc(vocab: tuple, value: Any) -> int:
    """Position of ``value`` in ``vocab``; unknown values map to the final "misc" slot."""
    try:
        return vocab.index(value)
    except ValueError:
        return len(vocab) - 1


def atom_features(atom) -> list[int]:
    """OGB's 9 categorical atom features of an RDKit atom."""
    return [
        _index_or_misc(ATOMIC_NUMS, atom.GetAtomicNum()),
        _index_or_misc(CHIRALITY, str(atom.GetChiralTag())),
        _index_or_misc(DEGREES, atom.GetTotalDegree()),
        _index_or_misc(FORMAL_CHARGES, atom.GetFormalCharge()),
        _index_or_misc(NUM_HS, atom.GetTotalNumHs()),
        _index_or_misc(RADICAL_ELECTRONS, atom.GetNumRadicalElectrons()),
        _index_or_misc(HYBRIDISATIONS, str(atom.GetHybridization())),
        int(bool(atom.GetIsAromatic())),
        int(bool(atom.IsInRing())),
    ]


def bond_features(bond) -> list[int]:
    """OGB's 3 categorical bond features of an RDKit bond (stereo has no "misc" slot in OGB:
    an unknown stereo label is an error there and here)."""
    stereo = str(bond.GetStereo())
    if stereo not in BOND_STEREO:
        raise ValueError(f"unknown bond stereo {stereo!r}")
    return [
        _index_or_misc(BOND_TYPES, str(bond.GetBondType())),
        BOND_STEREO.index(stereo),
        int(bool(bond.GetIsConjugated())),
    ]


def smiles_to_graph(smiles: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(x (n, 9), edge_index (2, 2m), edge_attr (2m, 3))`` of a SMILES string, as OGB's
    ``smiles2graph``: implicit hydrogens, every bond as two directed edges (i->j, j->i)."""
    from rdkit import Chem

    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise ValueError(f"RDKit cannot parse SMILES {smiles[:80]!r}")
    if mol.GetNumAtoms() == 0:
        raise ValueError(f"SMILES {smiles[:80]!r} has no atoms")
    x = torch.tensor([atom_features(a) for a in mol.GetAtoms()], dtype=torch.long)
    pairs, feats = [], []
    for bond in mol.GetBonds():
        i, j = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()
        f = bond_features(bond)
        pairs += [(i, j), (j, i)]
        feats += [f, f]
    if pairs:
        edge_index = torch.tensor(pairs, dtype=torch.long).T.contiguous()
        edge_attr = torch.tensor(feats, dtype=torch.long)
    else:
        edge_index = torch.zeros(2, 0, dtype=torch.long)
        edge_attr = torch.zeros(0, 3, dtype=torch.long)
    return x, edge_index, edge_attr


def _parse_rows(rows: Sequence[tuple[int, str]]) -> list[tuple[Tensor, Tensor, Tensor]]:
    from rdkit import RDLogger

    RDLogger.DisableLog("rdApp.*")  # per-molecule warnings would flood the log
    out = []
    for row, smiles in rows:
        try:
            out.append(smiles_to_graph(smiles))
        except ValueError as e:
            raise ValueError(f"row {row} of the Peptides-func csv: {e}") from e
    return out


# ----------------------------------------------------------------------------- safe loading
def strict_torch_load(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` without PyG's fallback to an unsafe load."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise RuntimeError(
            f"{path} holds objects that torch.load(weights_only=True) refuses to load; it was "
            f"not written by this version of the data pipeline. Delete it to re-process.\n{e}"
        ) from e


def _tensor_from_bytes(b: bytes):
    return torch.load(io.BytesIO(b), map_location="cpu", weights_only=True)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles containers of tensors and nothing else (the LRGB superpixel ``.pickle`` files
    are lists of tuples of tensors); any other global is refused."""

    ALLOWED = {
        ("collections", "OrderedDict"),
        ("torch._utils", "_rebuild_tensor"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("builtins", "list"), ("builtins", "tuple"), ("builtins", "dict"), ("builtins", "set"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _tensor_from_bytes  # storages through the safe loader
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name}")


def restricted_pickle_load(f) -> Any:
    """``pickle.load`` limited to containers of tensors (see :class:`RestrictedUnpickler`)."""
    return RestrictedUnpickler(f).load()


class _SafeLoadMixin:
    def load(self, path: str, data_cls: type = Data) -> None:
        out = strict_torch_load(path)
        if not isinstance(out, tuple) or len(out) not in (2, 3):
            raise RuntimeError(f"{path} is not a processed PyG dataset")
        data, self.slices = out[0], out[1]
        if len(out) == 3:
            data_cls = out[2]
        self.data = data_cls.from_dict(data) if isinstance(data, dict) else data


@contextlib.contextmanager
def _safe_lrgb_raw_readers() -> Iterator[None]:
    """During ``LRGBDataset.process``: the raw pickles through :func:`restricted_pickle_load`,
    the raw ``.pt`` files through :func:`strict_torch_load` (the module reads both through its
    own ``pickle`` / ``fs`` names, so swapping those two names is enough)."""
    import torch_geometric.datasets.lrgb as lrgb

    class _Pickle:
        load = staticmethod(restricted_pickle_load)

    class _Fs:
        def __getattr__(self, name):
            return getattr(real_fs, name)

        @staticmethod
        def torch_load(path, map_location=None):
            return strict_torch_load(path)

    real_pickle, real_fs = lrgb.pickle, lrgb.fs
    lrgb.pickle, lrgb.fs = _Pickle, _Fs()
    try:
        yield
    finally:
        lrgb.pickle, lrgb.fs = real_pickle, real_fs


def attach_structure(data: Data, slices: dict[str, Tensor] | None) -> tuple[Data, dict | None]:
    """Add ``bfs_depth`` (per node) and ``diameter`` (per graph) to an InMemoryDataset's
    collated storage, computed for all graphs in one vectorised pass (a per-graph
    ``pre_transform`` would pay the per-call overhead 123k times on COCO-SP)."""
    if slices is None:  # a single graph is stored without slices
        data.bfs_depth, data.diameter = graph_structure(data.edge_index, data.num_nodes)
        return data, slices
    node_ptr = slices["x"] if "x" in slices else slices["num_nodes"]
    counts = node_ptr[1:] - node_ptr[:-1]
    ecounts = slices["edge_index"][1:] - slices["edge_index"][:-1]
    # graphs are stored with local node ids: shift them into one disjoint union
    ei = data.edge_index + torch.repeat_interleave(node_ptr[:-1], ecounts)
    batch = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    data.bfs_depth, data.diameter = graph_structure(ei, int(counts.sum()), batch)
    slices = dict(slices, bfs_depth=node_ptr.clone(),
                  diameter=torch.arange(counts.numel() + 1))
    return data, slices


class SafeLRGBDataset(_SafeLoadMixin, LRGBDataset):
    """PyG's :class:`~torch_geometric.datasets.LRGBDataset` with safe file reading (module
    docstring). Same arguments, plus ``structure=True`` to store every graph's BFS depths and
    diameter with the processed files (computed once, for each split in one vectorised pass;
    kept in ``processed_structure/`` so that the plain processed files stay as PyG writes them).
    Downloads on first use."""

    def __init__(self, root: str, name: str, split: str = "train", transform=None,
                 pre_transform=None, pre_filter=None, force_reload: bool = False,
                 structure: bool = False) -> None:
        self.structure = structure
        super().__init__(root, name, split, transform, pre_transform, pre_filter,
                         force_reload=force_reload)

    @property
    def processed_dir(self) -> str:
        base = super().processed_dir
        return base + "_structure" if self.structure else base

    def process(self) -> None:
        with _safe_lrgb_raw_readers():
            super().process()
        if self.structure:
            for split in ("train", "val", "test"):
                path = os.path.join(self.processed_dir, f"{split}.pt")
                out = strict_torch_load(path)
                data_cls = out[2] if len(out) == 3 else Data
                data = data_cls.from_dict(out[0]) if isinstance(out[0], dict) else out[0]
                data, slices = attach_structure(data, out[1])
                torch.save((data.to_dict(), slices, data.__class__), path)


# ----------------------------------------------------------------------------- raw Peptides-func
def default_cache_dir(name: str) -> Path:
    """``$CHIMERA_CACHE_DIR/<name>`` or ``~/.cache/chimera/<name>``."""
    base = os.environ.get("CHIMERA_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "chimera")
    return Path(base) / name


def file_md5(path: str | os.PathLike) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class PeptidesFuncRaw(_SafeLoadMixin, InMemoryDataset):
    """Peptides-func from the official raw release, offline.

    ``root`` holds ``peptide_multi_class_dataset.csv.gz`` (its md5 is checked against LRGB's)
    and ``splits_random_stratified_peptide.json`` (the official split). The first use parses
    every SMILES (about 90 s for 15,535 molecules on one core; ``parse_workers`` processes in
    parallel) and caches graphs, labels and, with ``structure=True``, the per-graph BFS depths and
    diameters under ``cache_dir``; later uses load the cache. ``subset=N`` keeps the first ``N``
    molecules (and the split's indices among them), for tests.

    Every graph: ``x (n, 9)`` long, ``edge_index``, ``edge_attr (2m, 3)`` long,
    ``y (1, 10)`` float (multi-label), ``bfs_depth (n,)``, ``diameter (1,)``.
    """

    CSV = "peptide_multi_class_dataset.csv.gz"
    SPLITS = "splits_random_stratified_peptide.json"
    MD5 = "701eb743e899f4d793f0e13c8fa5a1b4"  # LRGB's published md5 of the csv.gz
    VERSION = 1  # bump when the featurisation changes, to invalidate caches

    def __init__(
        self,
        root: str | os.PathLike,
        split: Literal["train", "val", "test"] = "train",
        cache_dir: str | os.PathLike | None = None,
        subset: int | None = None,
        structure: bool = True,
        transform=None,
        check_md5: bool = True,
        parse_workers: int = 0,
        force_reload: bool = False,
        config_key: str = "data.root",
    ) -> None:
        self.release_dir = Path(os.path.expanduser(str(root)))
        for fname in (self.CSV, self.SPLITS):
            if not (self.release_dir / fname).is_file():
                raise FileNotFoundError(
                    f"Peptides-func raw release not found: {self.release_dir / fname} does not "
                    f"exist. Set {config_key}=<folder holding {self.CSV} and {self.SPLITS}> "
                    "(e.g. ../shared/data/peptides-func), or use source='pyg' to download "
                    "LRGB's processed release.")
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        if subset is not None and subset <= 0:
            raise ValueError(f"subset must be a positive number of molecules, got {subset}")
        self.md5 = file_md5(self.release_dir / self.CSV)
        if check_md5 and self.md5 != self.MD5:
            raise ValueError(
                f"{self.release_dir / self.CSV} has md5 {self.md5}, LRGB's release has "
                f"{self.MD5}; pass check_md5=False to use a modified file")
        self.subset, self.structure, self.parse_workers = subset, structure, parse_workers
        self.split = split
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir("peptides-func")
        super().__init__(str(cache), transform=transform, force_reload=force_reload)
        self.load(self.processed_paths[0])
        ids = torch.as_tensor(self._split_indices()[split], dtype=torch.long)
        self._indices = ids.tolist()

    # the release stays where it is: no copy into the cache
    @property
    def raw_dir(self) -> str:
        return str(self.release_dir)

    @property
    def processed_dir(self) -> str:
        return self.root

    @property
    def raw_file_names(self) -> list[str]:
        return [self.CSV, self.SPLITS]

    @property
    def processed_file_names(self) -> list[str]:
        sub = "all" if self.subset is None else f"first{self.subset}"
        st = "structure" if self.structure else "plain"
        return [f"peptides_func_v{self.VERSION}_{self.md5[:12]}_{sub}_{st}.pt"]

    def download(self) -> None:  # files are checked in __init__; nothing is ever downloaded
        raise FileNotFoundError(f"missing raw files under {self.raw_dir}")

    def _split_indices(self) -> dict[str, list[int]]:
        with open(self.release_dir / self.SPLITS) as f:
            splits = json.load(f)
        if set(splits) != {"train", "val", "test"}:
            raise ValueError(f"{self.SPLITS} must have train/val/test keys, got {sorted(splits)}")
        # a dataset of one graph is stored without slices
        n = self.slices["x"].numel() - 1 if self.slices is not None else 1
        return {k: [i for i in v if i < n] for k, v in splits.items()}

    def _read_rows(self) -> tuple[list[tuple[int, str]], list[list[int]]]:
        import csv

        rows, labels = [], []
        with gzip.open(self.release_dir / self.CSV, "rt", newline="") as f:
            reader = csv.DictReader(f)
            for k, rec in enumerate(reader):
                if self.subset is not None and k >= self.subset:
                    break
                idx = int(rec[""]) if rec.get("") not in (None, "") else k
                if idx != k:
                    raise ValueError(f"{self.CSV}: row {k} has index {idx}; the split refers to "
                                     "row positions, so rows must be in order")
                rows.append((k, rec["smiles"]))
                labels.append(json.loads(rec["labels"]))
        if not rows:
            raise ValueError(f"{self.CSV} has no rows")
        return rows, labels

    def process(self) -> None:
        rows, labels = self._read_rows()
        if self.parse_workers and self.parse_workers > 1:
            import multiprocessing as mp

            chunks = [rows[i::self.parse_workers] for i in range(self.parse_workers)]
            with mp.get_context("fork").Pool(self.parse_workers) as pool:
                parts = pool.map(_parse_rows, chunks)
            graphs: list = [None] * len(rows)
            for w, part in enumerate(parts):
                graphs[w::self.parse_workers] = part
        else:
            graphs = _parse_rows(rows)
        if self.structure:
            depths, dias = structure_for_graphs([g[1] for g in graphs],
                                                [g[0].shape[0] for g in graphs])
        data_list = []
        for k, ((x, ei, ea), y) in enumerate(zip(graphs, labels, strict=True)):
            if len(y) != 10:
                raise ValueError(f"row {k} of {self.CSV}: expected 10 labels, got {len(y)}")
            d = Data(x=x, edge_index=ei, edge_attr=ea,
                     y=torch.tensor(y, dtype=torch.float).view(1, -1), num_nodes=x.shape[0])
            if self.structure:
                d.bfs_depth, d.diameter = depths[k], dias[k].view(1)
            data_list.append(validate_graph(d, f"row {k} of {self.CSV}"))
        self.save(data_list, self.processed_paths[0])


# ----------------------------------------------------------------------------- data module
def _head(ds: Any, n: int | None) -> Any:
    """The first ``n`` graphs of a split (all when ``n`` is None). LRGB's splits are random
    (Peptides: stratified), so a split's head is a fair sample of it."""
    if n is None:
        return ds
    if n <= 0:
        raise ValueError(f"a split subset must be a positive number of graphs, got {n}")
    return ds[: min(n, len(ds))]


class LRGBDataModule(LightningDataModule):
    """Train / val / test loaders for an LRGB dataset (PyG batches).

    The training loader is the shared :func:`tasks.core.data.train_loader` (a seeded epoch
    order, exact mid-epoch resume, DDP sharding by rank; set ``trainer.use_distributed_sampler``
    to false, as the shared trainer config does) with PyG's ``Collater``.

    Args:
        name: ``"peptides-func"``, ``"peptides-struct"``, ``"pascalvoc-sp"`` or ``"coco-sp"``.
        root: ``source="pyg"``: where PyG downloads and processes the dataset;
            ``source="raw"``: the folder of the raw Peptides-func release.
        source: ``"pyg"`` (:class:`SafeLRGBDataset`, downloads) or ``"raw"``
            (:class:`PeptidesFuncRaw`, offline; Peptides-func only).
        batch_size: training batch size (Table 11: 64 / 64 / 32 / 32); ``eval_batch_size``
            defaults to it.
        structure: pre-compute BFS depths and diameters for Chimera (cached with the data).
        subset: keep the first ``subset`` graphs (raw: molecules of the release, parsed and
            cached on their own; pyg: graphs of every split), for tests and smoke runs.
        subset_train, subset_val, subset_test: keep the first graphs of one split of the full
            dataset (small budgets on the full, cached parse).
        test_each_epoch: evaluate the test split beside validation every epoch (a second
            validation loader), for the test score at the best validation epoch
            (:class:`tasks.graph.module.BestEpoch`).
        seed: the training order's seed (the run's seed).
        cache_dir: cache of the raw loader (default ``~/.cache/chimera/peptides-func``).
        download: ``source="pyg"``: download when the processed files are missing.
        config_key: the config key of ``root``, named in the missing-data error.
    """

    def __init__(
        self,
        name: str,
        root: str | os.PathLike,
        source: Literal["pyg", "raw"] = "pyg",
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        structure: bool = True,
        subset: int | None = None,
        subset_train: int | None = None,
        subset_val: int | None = None,
        subset_test: int | None = None,
        test_each_epoch: bool = False,
        seed: int = 0,
        cache_dir: str | os.PathLike | None = None,
        check_md5: bool = True,
        parse_workers: int = 0,
        download: bool = True,
        config_key: str = "data.root",
    ) -> None:
        super().__init__()
        key = name.lower()
        if key not in LRGB_NAMES:
            raise ValueError(f"unknown LRGB dataset {name!r}; choose one of {LRGB_NAMES}")
        if source not in ("pyg", "raw"):
            raise ValueError(f"source must be 'pyg' or 'raw', got {source!r}")
        if source == "raw" and key != "peptides-func":
            raise ValueError(
                f"source='raw' reads the official Peptides-func release only; {name} needs "
                "source='pyg' (PyG's LRGBDataset downloads it)")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.name, self.root, self.source = key, root, source
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.structure, self.subset, self.cache_dir = structure, subset, cache_dir
        self.split_subsets = {"train": subset_train, "val": subset_val, "test": subset_test}
        self.test_each_epoch, self.seed = test_each_epoch, int(seed)
        self.check_md5, self.parse_workers = check_md5, parse_workers
        self.download, self.config_key = download, config_key
        self.datasets: dict[str, Any] = {}

    @property
    def task(self) -> LRGBTask:
        """Output size, task level, loss and metric of this dataset."""
        return LRGB_TASKS[self.name]

    @property
    def has_test(self) -> bool:
        return True

    def _missing(self, why: str) -> DataNotFoundError:
        how = ("the folder holding peptide_multi_class_dataset.csv.gz and "
               "splits_random_stratified_peptide.json (e.g. ../shared/data/peptides-func)"
               if self.source == "raw" else
               f"a folder where PyG's LRGBDataset finds (or can download) {self.name}")
        return DataNotFoundError(f"{self.name} ({self.source}) not found: {why}. "
                                 f"Set {self.config_key}=<{how}>.")

    def _build(self, split: str):
        if self.source == "raw":
            try:
                ds = PeptidesFuncRaw(self.root, split, cache_dir=self.cache_dir,
                                     subset=self.subset, structure=self.structure,
                                     check_md5=self.check_md5, parse_workers=self.parse_workers,
                                     config_key=self.config_key)
            except FileNotFoundError as e:
                raise self._missing(str(e).split(". Set ")[0]) from e
            return _head(ds, self.split_subsets[split])
        processed = Path(str(self.root)) / self.name / (
            "processed_structure" if self.structure else "processed")
        if not self.download and not (processed / f"{split}.pt").is_file():
            raise self._missing(f"{processed / (split + '.pt')} does not exist and "
                                "download is off")
        try:
            ds = SafeLRGBDataset(str(self.root), self.name, split=split,
                                 structure=self.structure)
        except (OSError, ConnectionError) as e:  # no network: URLError is an OSError
            raise self._missing(f"it is not under {self.root} and the download failed "
                                f"({type(e).__name__}: {e})") from e
        ds = ds[: self.subset] if self.subset is not None else ds
        return _head(ds, self.split_subsets[split])

    def prepare_data(self) -> None:
        # builds (downloads / parses) and caches once, before any process reads it
        self._build("train")

    def setup(self, stage: str | None = None) -> None:
        for split in ("train", "val", "test"):
            if split not in self.datasets:
                self.datasets[split] = self._build(split)

    def _eval_loader(self, split: str) -> DataLoader:
        if split not in self.datasets:
            self.setup()
        return DataLoader(self.datasets[split], batch_size=self.eval_batch_size, shuffle=False,
                          num_workers=self.num_workers, pin_memory=self.pin_memory,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> ResumableDataLoader:
        if "train" not in self.datasets:
            self.setup()
        ds = self.datasets["train"]
        return train_loader(ds, batch_size=self.batch_size, seed=self.seed, shuffle=True,
                            collate_fn=Collater(ds), num_workers=self.num_workers,
                            pin_memory=self.pin_memory,
                            persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        if self.test_each_epoch:  # loader 1 is logged as test/* (tasks.graph.module)
            return [self._eval_loader("val"), self._eval_loader("test")]
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
