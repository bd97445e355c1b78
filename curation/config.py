"""Curation configuration: dataclass defaults, YAML overrides in configs/curation/*.yaml.

Loaded with :func:`dinosys.config.load_config` (``kind="curation"``), so unknown keys, wrong types
and bad values end as one-line ``ConfigError`` messages like every other dinosys config.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from dinosys.config import check_choice, check_range
from dinosys.errors import ConfigError


@dataclass
class SourceConfig:
    """One image input: a folder (recursive), a file list (.txt, one path a line) or WebDataset
    shards (a .tar, a directory of .tar files, or a brace pattern like ``d/{000000..000009}.tar``).
    """

    path: str = MISSING
    name: str | None = None  # how the manifest names this source; None: derived from the path
    kind: str = "auto"  # auto, folder, list, shards

    def __post_init__(self) -> None:
        check_choice(self.kind, ("auto", "folder", "list", "shards"), "sources.kind")


@dataclass
class EmbedConfig:
    """Feature extraction with a backbone."""

    # dinosys run/export/checkpoint directory, "timm:<model name>", "builtin:copy_detector"
    # (the small copy-detection ViT shipped in curation/assets, trained by curation.copy_train)
    # or "builtin:pixels" (centred grey pixels: near-duplicates of tiny images such as MNIST)
    model: str = MISSING
    features: str = "cls_avgpool"  # cls, avgpool, cls_avgpool
    n_layers: int = 1  # concatenate the features of the last n blocks (get_intermediate_layers)
    img_size: int = 224  # resize the shorter side, then centre-crop to this size
    batch_size: int = 64
    num_workers: int = 2  # DataLoader decode workers
    chunk_size: int = 1024  # images per resumable output chunk
    max_image_pixels: int = 89_478_485
    device: str = "auto"  # auto, cpu, cuda
    mean: list[float] | None = None  # None: the model's (exported config) or ImageNet's
    std: list[float] | None = None

    def __post_init__(self) -> None:
        check_choice(self.features, ("cls", "avgpool", "cls_avgpool"), "embed.features")
        check_choice(self.device, ("auto", "cpu", "cuda"), "embed.device")
        for key in ("n_layers", "img_size", "batch_size", "chunk_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key 'embed.{key}': must be >= 1")
        if self.num_workers < 0:
            raise ConfigError("config key 'embed.num_workers': must be >= 0")


@dataclass
class IndexConfig:
    """k-NN search backend (FAISS). ``auto``: exact below ``flat_max``, IVF-Flat up to
    ``ivfpq_min``, IVF-PQ with exact re-ranking above."""

    kind: str = "auto"  # auto, flat, ivf, ivfpq
    flat_max: int = 100_000
    ivfpq_min: int = 20_000_000
    nlist: int | None = None  # None: about 2*sqrt(N)
    # lists probed per query, of ~2*sqrt(N): recall of the exact pairs above 0.6 in
    # tools/bench_curation.py was 0.98 with 4 (200k), 0.993 with 8 and 1.0 with 16 (400k)
    nprobe: int = 16
    pq_m: int = 32  # PQ sub-quantisers (must divide the dimension)
    rerank_k: int = 128  # IVF-PQ: candidates per query re-scored by exact dot product
    train_size: int = 131_072
    use_gpu: bool = True  # when faiss sees GPUs
    query_batch: int = 65_536
    # queries a dedup part searches at once: its heaps, probes and vectors (about 1 KiB each
    # at k=64, d=256) are what it holds, whatever the size of the pool
    part_block: int = 262_144

    def __post_init__(self) -> None:
        check_choice(self.kind, ("auto", "flat", "ivf", "ivfpq"), "index.kind")
        if self.part_block < 1:
            raise ConfigError("config key 'index.part_block': must be >= 1")
        if self.nprobe < 1:
            raise ConfigError("config key 'index.nprobe': must be >= 1")


@dataclass
class VerifyConfig:
    """Geometric verification of the candidate copy pairs above ``dedup.threshold`` (SIFT,
    RANSAC similarity transform, correlation of the aligned images; :mod:`curation.verify`).
    Only confirmed pairs join copy groups; decontamination stays unverified (stricter on purpose).
    """

    enabled: bool = False
    max_side: int = 256  # longer image side for matching (small images are enlarged)
    n_features: int = 500  # SIFT keypoints per image (1000: same results, 1.4x slower)
    # SIFT's contrast threshold; below OpenCV's 0.04 so low-contrast and blurred images still
    # get keypoints (copies grouped in tools/bench_curation.py: 0.85 at 0.04, 0.94 at 0.01)
    contrast_threshold: float = 0.01
    ratio: float = 0.8  # Lowe ratio test
    min_inliers: int = 10  # RANSAC inliers of the similarity transform
    ransac_px: float = 4.0  # reprojection tolerance, pixels at max_side
    min_overlap: float = 0.6  # aligned frames' overlap / area of the image more inside the other
    min_correlation: float = 0.65  # median NCC of the aligned, band-passed grey images over cells
    grid: int = 6  # the overlap is cut into grid x grid cells for the correlation
    min_cell_std: float = 2.0  # cells flat in both images (grey-level std below) carry no vote
    flip: bool = True  # also try with one image mirrored
    # candidate pairs at or above this cosine are copies without verification (the sure pairs
    # of a strong copy embedding such as SSCD; saves time). None: verify every candidate
    accept_above: float | None = None
    workers: int = 2  # threads (OpenCV releases the GIL)
    block_size: int = 4096  # pairs per resumable block
    cache_images: int = 20_000  # features kept in memory

    def __post_init__(self) -> None:
        check_range(self.min_overlap, "dedup.verify.min_overlap", 0.0, 1.0)
        check_range(self.min_correlation, "dedup.verify.min_correlation", -1.0, 1.0)
        check_range(self.ratio, "dedup.verify.ratio", 0.0, 1.0)
        for key in ("max_side", "n_features", "min_inliers", "block_size", "cache_images", "grid"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key 'dedup.verify.{key}': must be >= 1")
        if self.min_inliers < 3:
            raise ConfigError("config key 'dedup.verify.min_inliers': must be >= 3")


@dataclass
class DedupConfig:
    """Near-duplicate removal (k-NN graph, connected components) and decontamination."""

    k: int = 64
    threshold: float = 0.6  # cosine similarity above which two images are copies
    representative: str = "smallest_id"  # smallest_id or largest (most pixels)
    eval_sources: list[SourceConfig] = field(default_factory=list)
    decontam_threshold: float = 0.45
    sweep: list[float] = field(default_factory=lambda: [0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 0.9])
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    # above this many k-NN edges, the merge dedupes them and finds connected components block
    # by block on the memory-mapped edge files instead of in memory
    spill_edges: int = 50_000_000

    def __post_init__(self) -> None:
        check_range(self.threshold, "dedup.threshold", -1.0, 1.0)
        check_range(self.decontam_threshold, "dedup.decontam_threshold", -1.0, 1.0)
        check_choice(self.representative, ("smallest_id", "largest"), "dedup.representative")
        if self.k < 2:
            raise ConfigError("config key 'dedup.k': must be >= 2 (the first neighbour is itself)")


@dataclass
class ClusterConfig:
    """Hierarchical k-means with resampling (Vo et al. 2024) and balanced sampling."""

    levels: list[int] = field(default_factory=lambda: [64, 8])  # clusters per level, fine first
    n_iter: int = 20
    n_resample: int = 2  # resampling steps per level
    resample_size: int = 5  # points taken nearest each centroid when resampling
    backend: str = "faiss"  # faiss or torch (torch.distributed, chunked)
    target_size: int | None = None  # balanced top-down sampling target; None: no sampling
    chunk_size: int = 65_536
    seed: int = 0
    # train the centroids on at most this many kept images (a seeded sample; None: all of them);
    # every image is then assigned by the cluster parts
    max_train_points: int | None = None

    def __post_init__(self) -> None:
        check_choice(self.backend, ("faiss", "torch"), "cluster.backend")
        if not self.levels or any(k < 1 for k in self.levels):
            raise ConfigError("config key 'cluster.levels': needs a non-empty list of counts >= 1")


@dataclass
class RetrieveConfig:
    """Retrieval of pool images similar to a curated query set (DINOv2 LVD-142M)."""

    queries: list[SourceConfig] = field(default_factory=list)  # empty: no retrieval stage
    mode: str = "both"  # sample, cluster, both
    k: int = 4  # sample-based: nearest pool images per query
    min_queries: int = 3  # cluster-based: clusters holding more than m query images ...
    per_cluster: int = 10_000  # ... contribute up to M images each
    per_source_cap: int | None = None  # at most this many retrieved images from one source

    def __post_init__(self) -> None:
        check_choice(self.mode, ("sample", "cluster", "both"), "retrieve.mode")


@dataclass
class ShardOutConfig:
    """The LVD-style WebDataset output."""

    max_count: int = 10_000  # samples per shard
    max_size: int = 1_000_000_000  # bytes per shard


@dataclass
class CurationConfig:
    """`dinosys-curate`: embed -> dedup/decontaminate -> cluster -> retrieve -> shard -> report."""

    name: str = "curation"
    out: str = MISSING  # work directory (stages, shards, manifest, report)
    seed: int = 0
    sources: list[SourceConfig] = field(default_factory=list)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    # a second embedding for dedup and decontamination only, e.g. a copy-detection model, while
    # `embed` (a DINOv2 backbone) serves clustering and retrieval: LVD-142M's split (SSCD for
    # copies, ViT-H for the rest). None: dedup uses `embed`
    copy_embed: EmbedConfig | None = None
    index: IndexConfig = field(default_factory=IndexConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    retrieve: RetrieveConfig = field(default_factory=RetrieveConfig)
    shards: ShardOutConfig = field(default_factory=ShardOutConfig)
    progress: bool = True
    # ingest stops with an error when more than this fraction of the listed images is
    # unreadable (missing, empty, in a damaged shard); below it they are rows with a reason
    max_unreadable_fraction: float = 0.1

    def __post_init__(self) -> None:
        check_range(self.max_unreadable_fraction, "max_unreadable_fraction", 0.0, 1.0)
