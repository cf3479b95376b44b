"""Samplers of the standalone world, built from ``data.shuffler_sampler`` by ORION's type names."""
from .group_sampler import GroupStreamBatchSampler, InfiniteGroupEachSampleInBatchSampler, group_flags  # noqa: F401
from .sampler import SAMPLER, build_sampler  # noqa: F401

__all__ = ["SAMPLER", "build_sampler", "InfiniteGroupEachSampleInBatchSampler", "GroupStreamBatchSampler",
           "group_flags"]
