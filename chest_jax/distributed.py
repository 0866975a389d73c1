"""Devices: the data-parallel mesh of a run, and multi-host initialisation.

One `data` mesh axis over every device of `training.device`; parameters and optimizer state are replicated and
the batch is sharded over it (`dataset.batch_size` is the global batch). On a cluster each host runs the same
command; `maybe_initialize_distributed` joins them before any JAX computation.

On a multi-core CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N makes N CPU devices and the same mesh
trains data-parallel over them (README "Benchmarks": the full-config step went from 24 to 31 samples/s with N = 2
on the 2-core machine, each core running half the batch instead of both splitting every op).
"""
from __future__ import annotations

import os
from typing import Callable

import jax

from chest_jax import config as config_lib


def make_mesh(cfg: config_lib.Config) -> jax.sharding.Mesh:
    """A 1-D mesh ('data',) over the devices of cfg.training.device; the batch size must divide evenly."""
    devices = jax.devices() if cfg.training.device == "auto" else jax.devices(cfg.training.device)
    n = len(devices)
    if cfg.dataset.batch_size % n:
        raise config_lib.ConfigError(
            f"dataset.batch_size: {cfg.dataset.batch_size} is not divisible by the {n} devices it is sharded over; "
            f"use a multiple of {n}")
    return jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def maybe_initialize_distributed(log: Callable[[str], None] = print) -> None:
    """Multi-host runs: call jax.distributed.initialize once per process when the environment names a cluster.

    JAX_COORDINATOR_ADDRESS (+ JAX_NUM_PROCESSES, JAX_PROCESS_ID) for any launcher; Slurm and Open MPI with more
    than one task are detected by JAX itself.
    """
    env = os.environ
    multi = (env.get("JAX_COORDINATOR_ADDRESS") or int(env.get("SLURM_NTASKS", "1")) > 1
             or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)
    if not multi or jax.distributed.is_initialized():
        return
    kwargs = {}
    if env.get("JAX_COORDINATOR_ADDRESS"):
        kwargs["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
        if env.get("JAX_NUM_PROCESSES"):
            kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
        if env.get("JAX_PROCESS_ID"):
            kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)
    log(f"jax.distributed: process {jax.process_index()} of {jax.process_count()}, "
        f"{jax.local_device_count()} local / {jax.device_count()} global devices")
