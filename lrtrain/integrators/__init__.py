"""Training methods with one step contract (see `base`).

`build(name, tx, **kwargs)` imports the method's module lazily, so a method
whose dependencies are heavy (or missing) costs nothing until it is asked
for. Names and modules:

  dense, factors, lora, galore  -> plain.py  (plain optax baselines)
  kls                           -> kls.py    (DLRT: KLS / rank-adaptive BUG)
  geolora                       -> geolora.py (parallel BUG / GeoLoRA)
  tdlrt                         -> tdlrt.py  (Tucker BUG for conv kernels)
  condlr                        -> condlr.py (approximate orthonormal constraints)
  sltrain                       -> sltrain.py (sparse plus low-rank, SLTrain)
  relora                        -> relora.py (LoRA merged and restarted every k steps)
"""

from __future__ import annotations

import importlib
import inspect

import optax

from lrtrain.integrators.base import Integrator

METHODS = {
    "dense": "plain",
    "factors": "plain",
    "lora": "plain",
    "galore": "plain",
    "kls": "kls",
    "geolora": "geolora",
    "tdlrt": "tdlrt",
    "condlr": "condlr",
    "sltrain": "sltrain",
    "relora": "relora",
}

# plain.py serves several names; it gets the name as `method`.
_SHARED_MODULES = {"plain"}

# The method other methods' step rates are quoted against (time/vs_dense).
REFERENCE = "dense"


def module_for(name: str):
  """The module implementing `name` (imported on first use).

  Raises:
    ValueError: unknown method name.
    ModuleNotFoundError: the method's module is not available.
  """
  if name not in METHODS:
    raise ValueError(f"unknown integrator {name!r}; valid names: "
                     f"{', '.join(sorted(METHODS))}")
  return importlib.import_module(f"lrtrain.integrators.{METHODS[name]}")


def options(name: str) -> frozenset[str]:
  """The option names `build(name, ...)` accepts (keyword arguments of the
  method's `make`, less `tx` and the shared module's `method`)."""
  mod = module_for(name)
  params = inspect.signature(mod.make).parameters
  only_for = getattr(mod, "ONLY_FOR", {})   # options of one name of a shared module
  return frozenset(k for k, p in params.items()
                   if k not in ("tx", "method") and p.kind == p.KEYWORD_ONLY
                   and only_for.get(k, name) == name)


def check_config(config) -> None:
  """The method's own checks of a config beyond its option values (the
  module's `check_config(config, method=name)`, where it has one).

  Raises:
    ValueError: naming the config field and what to do.
  """
  name = config.integrator.name
  check = getattr(module_for(name), "check_config", None)
  if check is not None:
    check(config, method=name)


def build(name: str, tx: optax.GradientTransformation, **kwargs) -> Integrator:
  """The integrator `name` using the optax transformation `tx`.

  Args:
    name: one of `METHODS`.
    tx: optimizer for the K, L, S sub-steps and the non-factor parameters.
    **kwargs: method options (tau, adaptive, r_min, r_max, transport,
      basis_period, variant, kappa_tau, weight_decay, ...).

  Returns:
    An `Integrator(init, step, resize)`.

  Raises:
    ValueError: unknown name or option.
  """
  mod = module_for(name)
  unknown = sorted(set(kwargs) - options(name))
  if unknown:
    raise ValueError(f"integrator {name!r}: unknown option(s) "
                     f"{', '.join(unknown)}; valid: {', '.join(sorted(options(name)))}")
  if METHODS[name] in _SHARED_MODULES:
    return mod.make(tx, method=name, **kwargs)
  return mod.make(tx, **kwargs)


__all__ = ["METHODS", "REFERENCE", "Integrator", "build", "check_config",
           "module_for", "options"]
