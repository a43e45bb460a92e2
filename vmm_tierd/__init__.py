"""vmm_tierd: tiers VM guest memory with userfaultfd, zstd and LMDB."""

__version__ = "0.1.0"
