"""Checks of a run's config before anything is written: every value that can be checked without training.

`preflight(config)` raises `ValueError` (or `FileNotFoundError` for missing data and weights) with a one-line
message naming the key, the bad value and a valid choice.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections

from gconv import data as data_lib
from gconv import parallel
from gconv.members import member_limit
from gconv.models import family_of, model_from_config
from gconv.optim import OPTIMIZERS, SCHEDULES
from gconv.progress import parse_steps

__all__ = ["preflight"]
_FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")


def _positive(config: ml_collections.ConfigDict, *keys: str) -> None:
    for key in keys:
        node = config
        for part in key.split("."):
            node = node[part]
        if not isinstance(node, (int, float)) or isinstance(node, bool) or not node > 0:
            raise ValueError(f"{key}={node!r} must be a positive number (e.g. --config.{key}=1 or more).")


def _check_values(config: ml_collections.ConfigDict) -> None:
    _positive(config, "data.batch_size", "data.eval_batch_size", "log_every_steps", "eval_every_steps",
              "checkpoint_every_steps", "keep_checkpoints", "storage_timeout_s")
    if not (config.num_steps > 0 or config.num_epochs > 0):
        raise ValueError(f"num_steps={config.num_steps} and num_epochs={config.num_epochs}: set one of them > 0.")
    if str(config.model.get("dtype", "float32")) not in _FLOAT_DTYPES:
        raise ValueError(f"model.dtype={config.model.dtype!r} is not a float type: use one of {list(_FLOAT_DTYPES)}.")
    for key, value in config.model.items():
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise ValueError(f"model.{key}={value} must be >= 1.")
    optim = config.optim
    if optim.name not in OPTIMIZERS:
        raise ValueError(f"optim.name={optim.name!r} is not known: use one of {list(OPTIMIZERS)}.")
    if optim.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule={optim.schedule!r} is not known: use one of {list(SCHEDULES)}.")
    for key in ("learning_rate", "weight_decay", "momentum", "warmup_epochs", "label_smoothing"):
        value = optim[key]
        if not math.isfinite(value) or value < 0 or (key == "learning_rate" and value == 0):
            raise ValueError(f"optim.{key}={value} must be a finite number >= 0"
                             f"{' and > 0' if key == 'learning_rate' else ''}.")
    precise = config.get("precise_bn_images", 0)
    if not isinstance(precise, int) or isinstance(precise, bool) or precise < 0:
        raise ValueError(f"precise_bn_images={precise!r} must be a whole number of training images >= 0 (0: off; "
                         f"e.g. --config.precise_bn_images=1024).")
    data_lib.num_threads(config.data.num_workers)
    data_lib.process_count(config.data.get("worker_processes", 0))
    if config.get("profile_steps"):
        parse_steps(config.profile_steps)


def _check_init_from(config: ml_collections.ConfigDict) -> None:
    from gconv.convert import init_from_path, read_state_dict

    path = init_from_path(config)  # a tag is looked up, and downloaded when not cached
    try:
        read_state_dict(path)
    except (FileNotFoundError, ImportError):
        raise
    except Exception as e:  # safetensors/torch raise their own types for a damaged file
        raise ValueError(f"init_from={str(path)!r} cannot be read as a PyTorch state dict ({type(e).__name__}: {e}): "
                         f"pass a .pth/.pt/.safetensors file saved from torchvision/timm/imgclsmob.") from e


def preflight(config: ml_collections.ConfigDict) -> None:
    """Checks sizes, intervals, names, dtypes, the model and its overrides, the mesh against the devices and batch
    sizes, that the groups split over `mesh.model`, that the dataset is present and that `init_from` reads."""
    _check_values(config)
    member_limit(config)
    mesh = parallel.make_mesh(config.mesh)
    parallel.check_batch_divides(config.data.batch_size, mesh)
    parallel.check_batch_divides(config.data.eval_batch_size, mesh)
    jnp.dtype(config.model.get("dtype", "float32"))
    model = model_from_config(config.model, 10)
    model_size = mesh.shape[parallel.MODEL]
    if config.parallel not in ("jit", "pmap") or (config.parallel == "pmap" and model_size > 1):
        raise ValueError(f"parallel={config.parallel!r} with mesh.model={model_size}: use 'jit' "
                         f"('pmap' runs data parallel only, mesh.model=1).")
    rules, fsdp = parallel.sharding_rules(config.sharding, model, mesh)
    if rules and not config.sharding.rules:
        groups = family_of(model).groups_of(model)
        if groups % model_size:
            raise ValueError(f"{family_of(model).name_of(model)} has {groups} group(s), not divisible by "
                             f"mesh.model={model_size}: group parallelism splits whole groups; run the points whose "
                             f"groups divide {model_size} (--point), or use --config.mesh.model=1.")
    source, _, info = data_lib.get_sources(config.data)
    if config.data.batch_size > len(source):
        raise ValueError(f"data.batch_size={config.data.batch_size} is larger than the {len(source)} training "
                         f"examples of {config.data.name!r}: use at most {len(source)}.")
    if mesh.size > 1:  # every sharding rule used, every split dividing
        model = model_from_config(config.model, info.num_classes)
        shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + info.image_shape)))
        parallel.partition_specs(shapes["params"], rules, mesh, fsdp)
    if config.init_from:
        _check_init_from(config)
